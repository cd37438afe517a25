"""Deconvnet projections (Zeiler & Fergus 2014): what in the image drove single units of a layer.

Selection (like the paper's "top activations"): the `top_k` channels whose maximum
activation over all positions is largest, each at its argmax position (ties: lower
channel / first position in row-major order). A channel target takes that channel at
its strongest position (no channel given: each image's top channel, the one with the largest
sum over positions, as for gradient targets); a neuron target takes that unit.

Each unit is projected to pixels alone: the image is stacked K times along the batch
dimension with a one-hot cotangent per copy, and the cached forward+backward graph of
rule set "deconvnet" (ReLU passes relu(upstream), MaxPool routes through its switches,
convolutions are transposed) runs once for all K (chunked by the memory budget).
Boxes are the unit's receptive field (graph.receptive_field) in input pixels; crops cut
that field out of the projection, zero-padded where it leaves the image.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidArgument
from ..graph.names import resolve_tensor
from ..graph.receptive_field import ReceptiveField, crop_box, receptive_fields
from ..models.inputs import shapes_at_sizes, static_sizes
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from . import batching
from .activations import compute_activations
from .attribution_common import channel_axis_of, chunks, image_spec, rows_per_run
from .gradient import Objective, require_finite, resolve_wrt, run_gradient
from .limits import DEFAULT_SERVER_MAX_BATCH
from .progress import NO_PROGRESS, MethodResult, Progress
from .targets import require_activation, require_channels_first, require_from_image, top_channels

DEFAULT_TOP_K = 9


def layer_tensor(model: LoadedModel, layer: str) -> str:
    if not layer:
        raise InvalidArgument("layer", "required: a 4-D feature tensor or its node")
    tensor = resolve_tensor(model.proto, layer, kind="layer")
    require_activation(model, tensor, "layer", layer, differentiable=True)
    require_from_image(model, tensor, "layer", layer)
    require_channels_first(model, tensor, "layer", layer)
    info = model.infos.get(tensor)
    if info is not None and info.shape is not None and len(info.shape) != 4:
        raise InvalidArgument("layer", f"{layer!r} ({tensor!r}) has shape {list(info.shape)}; "
                                       "deconvnet projections need a 4-D feature tensor [N, C, H, W]")
    return tensor


def select_units(act: np.ndarray, top_k: int, target: Objective | None) -> tuple[np.ndarray, np.ndarray]:
    """(channels [N, K], positions [N, K, 2]) of the units to project."""
    n, c, h, w = act.shape
    flat = act.reshape(n, c, h * w)
    if target is None:
        k = min(top_k, c)
        strength = flat.max(axis=2)                                   # [N, C]
        channels = np.argsort(-strength, axis=1, kind="stable")[:, :k]
    else:
        ch = np.asarray(target.channel, dtype=np.int64).reshape(-1)
        if ch.size == 0 and target.kind == "channel":
            ch = top_channels(act)
        if ch.size == 0:
            raise InvalidArgument(f"target.{target.kind}.channel", "required")
        if ch.size not in (1, n):
            raise InvalidArgument(f"target.{target.kind}.channel", f"give one value or one per sample ({n})")
        if (ch < 0).any() or (ch >= c).any():
            raise InvalidArgument(f"target.{target.kind}.channel", f"must be in [0, {c})")
        channels = np.broadcast_to(ch, (n,))[:, None].astype(np.int64)
    idx = np.take_along_axis(flat, channels[:, :, None], axis=1).argmax(axis=2)   # [N, K]
    positions = np.stack([idx // w, idx % w], axis=-1)
    if target is not None and target.kind == "neuron":
        y, x = (int(v) for v in target.position)
        if not (0 <= y < h and 0 <= x < w):
            raise InvalidArgument("target.neuron", f"position ({y}, {x}) outside the layer's {h}x{w} positions")
        positions[:] = (y, x)
    return channels.astype(np.int64), positions.astype(np.int64)


def unclipped_box(rf: ReceptiveField, y: int, x: int) -> tuple[int, int, int, int]:
    """crop_box before clipping to the image (same rounding)."""
    box = []
    for k, u in enumerate((y, x)):
        c = rf.offset[k] + u * rf.jump[k]
        half = (rf.size[k] - 1) / 2
        box.append((math.floor(c - half + 1e-9), math.ceil(c + half - 1e-9) + 1))
    if rf.transposed:   # the tensor's first axis runs along the input's columns
        box.reverse()
    (top, bottom), (left, right) = box
    return top, left, bottom, right


def deconvnet(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray], layer: str,
              top_k: int = DEFAULT_TOP_K, target: Objective | None = None, crop: bool = False,
              rule_set: str = "deconvnet", progress: Progress = NO_PROGRESS,
              max_batch: int = DEFAULT_SERVER_MAX_BATCH, preprocess=None) -> MethodResult:
    """`max_batch`: the server's limit on rows per onnxruntime run (--max-batch); `preprocess`: the
    request's, which with the model's config says the input's layout. Projections and crops come
    in the input's layout ([C, H, W] or [H, W, C] per unit), like every attribution."""
    if top_k < 0:
        raise InvalidArgument("top_k", f"must be >= 0 (0 = default {DEFAULT_TOP_K}), got {top_k}")
    top_k = top_k or DEFAULT_TOP_K
    tensor = layer_tensor(model, layer)
    if target is not None:
        if target.kind not in ("channel", "neuron"):
            raise InvalidArgument("target", f"deconvnet takes a channel or neuron target of the layer, not {target.kind!r}")
        if target.layer and resolve_tensor(model.proto, target.layer, kind="layer") != tensor:
            raise InvalidArgument(f"target.{target.kind}.layer", f"{target.layer!r} is not the request's layer {layer!r}")
    image_input = model.image_input
    x = feeds[image_input]
    act = compute_activations(runtime, model, feeds, [tensor])[tensor]
    if act.ndim != 4:
        raise InvalidArgument("layer", f"{layer!r} has shape {list(act.shape)}; deconvnet projections need a "
                                       "4-D feature tensor [N, C, H, W]")
    require_finite(f"tensor {tensor!r}", act)
    n, c, h, w = act.shape
    channels, positions = select_units(act, top_k, target)
    k = channels.shape[1]
    activations = act[np.arange(n)[:, None], channels, positions[..., 0], positions[..., 1]]

    # row r = image r // k, unit r % k; one one-hot cotangent per row
    rows = np.repeat(np.arange(n), k)
    cot = np.zeros((n * k, c, h, w), act.dtype)
    cot[np.arange(n * k), channels.reshape(-1), positions[..., 0].reshape(-1), positions[..., 1].reshape(-1)] = 1
    wrt_map = resolve_wrt(model, ["input"])
    projections = np.empty((n * k,) + x.shape[1:], x.dtype)
    chunk = rows_per_run(model, x, 0, 0, max_batch)
    progress.update(0, n * k, "deconvnet")
    for sl in chunks(n * k, chunk):
        run_feeds = batching.row_feeds(model, feeds, rows[sl])   # padded to a fixed batch: results dropped
        res = run_gradient(runtime, model, run_feeds, tensor, batching.padded(model, cot[sl], zeros=True), wrt_map,
                           rule_set)
        projections[sl] = res.gradients["input"][:sl.stop - sl.start]
        progress.update(sl.stop, n * k, "deconvnet")
    projections = projections.reshape((n, k) + x.shape[1:])

    tensors = {"projections": projections, "channels": channels, "positions": positions,
               "activations": activations.astype(np.float32)}
    text = {"layer": tensor, "rule_set": rule_set,
            "selection": ("top-k channels by their max activation, each at its argmax position" if target is None
                          else f"{target.kind} target")}
    nhwc = channel_axis_of(image_spec(model, preprocess, x)[0], x) == 3
    in_hw = x.shape[1:3] if nhwc else x.shape[2:4]
    rf = _receptive_fields(model, x.shape).get(tensor)
    if rf is None:
        text["boxes"] = f"no receptive field known for {tensor!r}: boxes cover the whole image"
        boxes = np.tile(np.array([0, 0, in_hw[0], in_hw[1]], np.int64), (n, k, 1))
    else:
        boxes = np.array([[crop_box(rf, int(y), int(xx), in_hw) for y, xx in positions[i]] for i in range(n)],
                         np.int64).reshape(n, k, 4)
        if rf.approximate:
            text["boxes"] = "receptive field is approximate (widened to whole pixels)"
    tensors["boxes"] = boxes
    if crop:
        chw = projections.transpose(0, 1, 4, 2, 3) if nhwc else projections
        crops = _crops(chw, positions, rf, in_hw)
        tensors["crops"] = crops.transpose(0, 1, 3, 4, 2) if nhwc else crops   # the projections' layout
    tensors["input"] = x
    return MethodResult(tensors=tensors, text=text)


def _receptive_fields(model: LoadedModel, image_shape) -> dict[str, ReceptiveField]:
    """The fields of the model's tensors; for a model whose image size is free, at this size (a
    SAME pad's split, as tf2onnx writes every Keras padding, depends on it: the fields were unknown
    and the boxes and crops the whole image), once per size."""
    sizes = static_sizes(model, {model.image_input: image_shape})
    if not sizes:
        return model.memo("receptive_fields", lambda: receptive_fields(model.proto))
    return model.memo_per("receptive_fields_at", sizes, lambda: receptive_fields(shapes_at_sizes(model, sizes)))


def _crops(projections: np.ndarray, positions: np.ndarray, rf: ReceptiveField | None, in_hw) -> np.ndarray:
    n, k = projections.shape[:2]
    H, W = int(in_hw[0]), int(in_hw[1])
    if rf is None or rf.is_global:
        return projections.copy()
    boxes = [[unclipped_box(rf, int(y), int(x)) for y, x in positions[i]] for i in range(n)]
    ch = max(b[2] - b[0] for row in boxes for b in row)
    cw = max(b[3] - b[1] for row in boxes for b in row)
    out = np.zeros((n, k, projections.shape[2], ch, cw), projections.dtype)
    for i in range(n):
        for j in range(k):
            top, left = boxes[i][j][:2]
            t0, l0 = max(top, 0), max(left, 0)
            t1, l1 = min(top + ch, H), min(left + cw, W)
            if t1 > t0 and l1 > l0:
                out[i, j, :, t0 - top:t1 - top, l0 - left:l1 - left] = projections[i, j, :, t0:t1, l0:l1]
    return out
