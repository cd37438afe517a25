"""Request inputs (raw tensors and encoded images) -> validated onnxruntime feeds."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..datatypes import datatype_of
from ..errors import InvalidArgument, ResourceExhausted
from ..gen import vis_pb2
from ..graph.loading import free_input_axes, shapes_at
from .config import resolve_image_spec
from .preprocess import preprocess_images
from .store import LoadedModel


@dataclass
class InputRequest:
    """What a request says about its inputs, proto-free except the preprocessing message."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # "" = the image input
    images: list[bytes] = field(default_factory=list)
    preprocess: vis_pb2.Preprocessing | None = None


def build_feeds(model: LoadedModel, req: InputRequest, max_batch: int = 256, field_name: str = "input") -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    image_input = model.image_input
    if len(req.images) > max_batch:  # before decoding any: each could be megapixels
        raise ResourceExhausted(f"{field_name}.images: {len(req.images)} images exceed the limit of {max_batch} "
                                "per request (--max-batch)")
    if "" in req.tensors and image_input in req.tensors:
        raise InvalidArgument(f"{field_name}.tensors", f"input {image_input!r} is given twice (as {image_input!r} "
                                                       "and as the unnamed image input); give it once")
    if req.images:
        if req.tensors.get("") is not None or image_input in req.tensors:
            raise InvalidArgument(f"{field_name}.images", f"give either images or a tensor for input {image_input!r}, not both")
        info = model.infos[image_input]
        where = f"{field_name}.preprocess"
        try:
            spec = resolve_image_spec(model.config, req.preprocess, image_input, info.shape or (), where)
        except InvalidArgument as exc:
            if exc.field != f"{where}.config.size" or "no static spatial size" not in exc.detail:
                raise
            # a model whose image size is free, and no size given: the images' own (they were refused)
            spec = resolve_image_spec(model.config, _at_own_size(model, req, f"{field_name}.images"), image_input,
                                      info.shape or (), where)
        feeds[image_input] = preprocess_images(req.images, spec, f"{field_name}.images")
    for name, arr in req.tensors.items():
        target = name or image_input
        if target not in model.input_names:
            raise InvalidArgument(f"{field_name}.tensors", f"{target!r} is not an input of the model; inputs: {model.input_names}")
        feeds[target] = arr
    missing = [n for n in model.input_names if n not in feeds]
    if missing:
        raise InvalidArgument(field_name, f"no value for model input(s) {missing}; send images or tensors")
    batches: dict[str, int] = {}
    image_first = first_dim(model, image_input)
    from_images = image_input if req.images and image_input not in req.tensors and "" not in req.tensors else None
    for name, arr in feeds.items():
        info = model.infos[name]
        # the field the value came from: images decoded for the image input, else a tensor
        where = f"{field_name}.images" if name == from_images else f"{field_name}.tensors[{name}]"
        if arr.dtype != info.dtype:
            raise InvalidArgument(where, f"dtype {_dt(arr.dtype)} not allowed; the model takes {_dt(info.dtype)}")
        shape = info.shape
        if shape is not None:
            ok = arr.ndim == len(shape) and all(not isinstance(d, int) or d == s for d, s in zip(shape, arr.shape))
            if not ok:
                want = "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"
                raise InvalidArgument(where, f"shape {list(arr.shape)} not allowed; the model takes {want}")
        if shape is not None and len(shape) == 0:
            pass   # a scalar input (a Clip bound, a scale): no batch
        elif arr.ndim == 0 or arr.shape[0] == 0:
            raise InvalidArgument(where, "empty batch")
        empty = [k for k, d in enumerate(shape or ()) if k and not isinstance(d, int) and arr.shape[k] == 0]
        if empty:   # a free image size of 0: nothing to run, and no window a backward graph could have
            raise InvalidArgument(where, f"shape {list(arr.shape)} is empty along axis {empty[0]}, which the model "
                                         "leaves free; send at least one element there")
        # an input whose first dimension is not the image input's (a static [1] scale, a lookup
        # table) has no batch: it is not counted or matched against the images
        first = first_dim(model, name)
        if arr.ndim and (name == image_input or first == image_first or not isinstance(first, int)):
            # the limit counts a batch the request chooses, not a size the model fixes
            if arr.shape[0] > max_batch and not isinstance(first, int):
                raise ResourceExhausted(f"{where}: batch of {arr.shape[0]} exceeds the limit of {max_batch}")
            batches[name] = arr.shape[0]
        if arr.dtype.kind == "f" and not all_finite(arr):
            raise InvalidArgument(where, "contains NaN or Inf; only finite values are allowed")
    if batches:
        batch = batches.get(image_input, max(batches.values()))
        for name, n in batches.items():
            if n == batch:
                continue
            if n == 1 and name != image_input and not isinstance(first_dim(model, name), int):
                # one row of another input (metadata, a class to condition on) for a batch of images: shared
                # by every image, as onnxruntime broadcasts it where the model was exported with that input [1, ...]
                # (its batch is made free on load, with the images')
                feeds[name] = np.ascontiguousarray(np.broadcast_to(feeds[name], (batch,) + feeds[name].shape[1:]))
                continue
            raise InvalidArgument(f"{field_name}.tensors[{name}]", f"batch size {n} differs from the other inputs' "
                                                                   f"{batch}")
    return feeds


def _at_own_size(model: LoadedModel, req: InputRequest, field: str) -> vis_pb2.Preprocessing:
    """The request's preprocessing with the images' own size (read from their headers; all alike),
    and, unless the config or the request sets one, a short side of that size: the centre crop
    then keeps the whole image. INVALID_ARGUMENT asking for a size where the sizes differ."""
    import io

    from PIL import Image

    sizes = set()
    for data in req.images:
        try:
            with Image.open(io.BytesIO(data)) as img:
                sizes.add((img.height, img.width))
        except Exception:  # noqa: BLE001 - undecodable: preprocess_images names it
            continue
    if len(sizes) != 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)) or "none decodable"
        raise InvalidArgument(field, f"the model's image size is free and no size is given: images of one size are "
                                     f"taken at it, these are {listed}; give size [H, W] (preprocess.config.size)")
    (h, w), = sizes
    pre = vis_pb2.Preprocessing()
    if req.preprocess is not None:
        pre.CopyFrom(req.preprocess)
    pre.config.size[:] = [h, w]
    if not pre.config.resize_short_side and not model.config.input.resize_short_side:
        pre.config.resize_short_side = min(h, w)
    return pre


def image_dims_at(model: LoadedModel, shape) -> tuple:
    """The image input's declared dims with its free ones (all but the batch) taken from `shape`,
    an image tensor's: a model whose image size is free resolves its preprocessing (value range,
    mean, std: a grey fill, IG's black baseline) at the size of the images it is given."""
    dims = tuple(model.infos[model.image_input].shape or ())
    if shape is None or len(shape) != len(dims):
        return dims if dims else tuple(shape or ())
    return tuple(d if isinstance(d, int) or k == 0 else int(n) for k, (d, n) in enumerate(zip(dims, shape)))


def static_sizes(model: LoadedModel, shapes) -> tuple:
    """The sizes that inputs of the given shapes ({input: shape}) give the model's free axes (the batch
    excepted), as a hashable ((input, ((axis, size), ...)), ...); () for a model whose input sizes are
    all fixed. What a graph specialized to them takes (graph.loading.with_static_sizes)."""
    free = model.memo("free_input_axes", lambda: free_input_axes(model.proto))
    out = []
    for name, axes in free.items():
        shape = shapes.get(name)
        if shape is not None and len(shape) == len(model.infos[name].shape or ()):
            out.append((name, tuple((a, int(shape[a])) for a in axes)))
    return tuple(out)


def shapes_at_sizes(model: LoadedModel, sizes: tuple):
    """The model's weightless graph at `sizes` (from static_sizes; graph.loading.shapes_at), made once
    per size and shared by what reads shapes there: the too-small check, receptive fields, occlusion's
    planning."""
    return model.memo_per("shapes_at", sizes, lambda: shapes_at(model.proto, {n: dict(a) for n, a in sizes}),
                          limit=16)   # graphs, if light ones: fewer kept than the small facts drawn from them


def first_dim(model: LoadedModel, name: str):
    """The declared first dimension of `name` (an int, a symbol or None): the batch of a batched input."""
    info = model.infos.get(name)
    return info.shape[0] if info is not None and info.shape else None


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or Inf in `arr`. A float32/float64 array is first checked through its sum of squares
    (one BLAS pass, NaN or Inf whenever an element is): a batch of images is checked in about half
    the time of isfinite().all(), which builds a mask as large as the batch. Only when that sum is
    not finite (a NaN or Inf, or finite values large enough to overflow it) are the elements looked at."""
    if arr.dtype in (np.float32, np.float64) and arr.flags.c_contiguous:
        flat = arr.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow only sends us to the exact check
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(arr).all())


def _dt(dtype) -> str:
    try:
        return datatype_of(dtype)
    except TypeError:
        return str(dtype)
