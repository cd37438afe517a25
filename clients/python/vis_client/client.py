"""The vis-service client: models, inspection, activations, filters and gradients.

Every method raises :class:`~vis_client.errors.VisError` (``.code``, ``.details``) when the
service answers with an error, and ``ValueError`` / ``TypeError`` for arguments that are
obviously wrong before anything is sent.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import grpc
import grpc.experimental
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from .errors import from_rpc_error
from .gen import vis_pb2
from .arguments import INT64_MAX, check_int
from .attribution import AttributionMixin
from .localization import LocalizationMixin
from .optimization import OptimizationMixin
from .shared_memory import INPUT_MIN_BYTES, RegionLease, SharedResultMemory
from .stream import Result, Unfinished, collect
from .tensors import DATATYPES, datatype_of, encode, to_proto
from .wire import make_stub, request_with_payloads

__all__ = ["Client", "Model", "TensorSpec", "NodeInfo", "ReceptiveField", "Inspection",
           "GradientResult", "Target", "PRESETS", "build_input_batch", "build_preprocessing",
           "build_target", "UPLOAD_CHUNK_BYTES"]

MiB = 1 << 20
UPLOAD_CHUNK_BYTES = 1 * MiB
#: Preprocessing presets the service knows (see ModelConfig.preset in vis.proto).
PRESETS = ("imagenet", "caffe", "raw255", "tf")

ModelRef = Union["Model", str]
ProgressFn = Callable[[vis_pb2.Progress], Any]


def _is_repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)  # protobuf >= 6.31; `label` is deprecated there
    return bool(rep) if rep is not None else field.label == field.LABEL_REPEATED


def _to_dict(msg: Message) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


# ----------------------------------------------------------------------------
# Plain data classes


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype and shape of a model tensor. ``shape`` entries are ints for static
    dimensions, the symbol (e.g. ``'N'``) for named dynamic ones and ``None`` otherwise."""
    name: str
    datatype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_proto(cls, s: vis_pb2.TensorSpec) -> "TensorSpec":
        names = list(s.dim_names)
        shape = []
        for i, d in enumerate(s.shape):
            if d >= 0:
                shape.append(int(d))
            else:
                shape.append(names[i] if i < len(names) and names[i] else None)
        return cls(s.name, s.datatype, tuple(shape))

    def shape_str(self) -> str:
        """``(N, 3, 224, 224)``-style text; ``?`` for unnamed dynamic dimensions."""
        if not self.shape:
            return "()" if self.datatype else "?"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.shape) + ")"

    def __str__(self) -> str:
        return f"{self.name}: {self.datatype}{self.shape_str()}"


@dataclass
class Model:
    """A model loaded in the service. Convenience methods forward to the owning :class:`Client`."""
    id: str
    names: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config: dict
    num_labels: int
    gradients_supported: bool
    gradients_unsupported_reason: str = ""
    source: str = ""
    size_bytes: int = 0
    client: "Client | None" = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, info: vis_pb2.ModelInfo, client: "Client | None" = None) -> "Model":
        return cls(id=info.id, names=list(info.names),
                   inputs=[TensorSpec.from_proto(s) for s in info.inputs],
                   outputs=[TensorSpec.from_proto(s) for s in info.outputs],
                   config=_to_dict(info.config), num_labels=int(info.num_labels),
                   gradients_supported=bool(info.gradients_supported),
                   gradients_unsupported_reason=info.gradients_unsupported_reason,
                   source=info.source, size_bytes=int(info.size_bytes), client=client)

    @property
    def name(self) -> str:
        """The first name, or the id when the model has none."""
        return self.names[0] if self.names else self.id

    def _client(self) -> "Client":
        if self.client is None:
            raise RuntimeError("this Model is not attached to a Client")
        return self.client

    def activations(self, x, layers=(), **kwargs) -> dict[str, np.ndarray]:
        """See :meth:`Client.activations`."""
        return self._client().activations(self, x, layers, **kwargs)

    def filters(self, layer: str, **kwargs) -> dict[str, np.ndarray]:
        """See :meth:`Client.filters`."""
        return self._client().filters(self, layer, **kwargs)

    def gradient(self, x, objective=None, *args, **kwargs) -> "GradientResult":
        """See :meth:`Client.gradient`."""
        return self._client().gradient(self, x, objective, *args, **kwargs)

    def inspect(self) -> "Inspection":
        """See :meth:`Client.inspect`."""
        return self._client().inspect(self)

    def unload(self) -> bool:
        """See :meth:`Client.unload`."""
        return self._client().unload(self)

    def __str__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        return f"{self.name} [{self.id}] inputs: {ins}; outputs: {outs}"


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of a 4-D feature tensor: ``size``/``jump``/``offset`` are (h, w)
    pairs in input pixels; ``global_`` when one unit sees the whole input; ``approximate``
    when the field is a bound (every influencing pixel inside, possibly a few more)."""
    size: tuple[int, int]
    jump: tuple[float, float]
    offset: tuple[float, float]
    global_: bool = False
    approximate: bool = False

    @classmethod
    def from_proto(cls, rf: vis_pb2.ReceptiveField) -> "ReceptiveField":
        return cls((int(rf.size_h), int(rf.size_w)), (rf.jump_h, rf.jump_w),
                   (rf.offset_h, rf.offset_w), bool(getattr(rf, "global")), bool(rf.approximate))

    def size_str(self) -> str:
        if self.global_:
            return "global"
        h, w = self.size
        text = f"{h}" if h == w else f"{h}x{w}"
        return f"<={text}" if self.approximate else text

    def jump_str(self) -> str:
        h, w = (_num(v) for v in self.jump)
        return h if h == w else f"{h}x{w}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass
class NodeInfo:
    """One graph node as the service reports it."""
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    output_specs: list[TensorSpec]
    parameter_count: int
    receptive_fields: dict[str, ReceptiveField]
    constant: bool = False   # depends on no graph input: builds a weight or a shape

    @classmethod
    def from_proto(cls, n: vis_pb2.NodeInfo) -> "NodeInfo":
        return cls(n.name, n.op_type, list(n.inputs), list(n.outputs),
                   [TensorSpec.from_proto(s) for s in n.output_specs], int(n.parameter_count),
                   {k: ReceptiveField.from_proto(v) for k, v in n.receptive_fields.items()}, bool(n.constant))

    @property
    def output_shapes(self) -> list[tuple[int | str | None, ...]]:
        """Shapes of the outputs, in order (see :class:`TensorSpec`)."""
        return [s.shape for s in self.output_specs]


@dataclass
class Inspection:
    """Result of :meth:`Client.inspect`."""
    model: Model
    nodes: list[NodeInfo]
    parameter_count: int
    opset: int
    ir_version: int
    producer: str
    # (H, W) the receptive fields hold at, for a model whose image size is free (its configured
    # size, else 224: a SAME pad's split, hence a field's offset, depends on it); () otherwise
    receptive_fields_at: tuple[int, ...] = ()
    # why no receptive field is given (no 4-D image input, or the node the trace stops at), else ""
    receptive_fields_note: str = ""

    def node(self, name: str) -> NodeInfo:
        """The node called ``name``, or the node producing the tensor ``name``."""
        for n in self.nodes:
            if n.name == name:
                return n
        for n in self.nodes:
            if name in n.outputs:
                return n
        raise KeyError(name)

    def summary(self, constants: bool = False) -> str:
        """A readable table: node name, op, output tensor(s), output shape, parameters,
        receptive field size / jump (in input pixels). Nodes that depend on no input (they
        build weights or shapes) are left out unless ``constants``; a line says how many."""
        m = self.model
        head = [f"model {m.name}  id {m.id}  opset {self.opset}  IR {self.ir_version}"
                + (f"  producer {self.producer}" if self.producer else ""),
                "inputs:  " + ", ".join(str(s) for s in m.inputs),
                "outputs: " + ", ".join(str(s) for s in m.outputs),
                f"parameters: {self.parameter_count:,}   labels: {m.num_labels}   gradients: "
                + ("yes" if m.gradients_supported else f"no ({m.gradients_unsupported_reason or 'unsupported'})"),
                ""]
        if self.receptive_fields_note:
            head.insert(-1, "receptive fields: none, " + self.receptive_fields_note)
        if self.receptive_fields_at:
            head.insert(-1, "receptive fields at an image size of "
                        + " x ".join(str(v) for v in self.receptive_fields_at) + " (the model's image size is free)")
        rows = [("name", "op", "output", "output shape", "params", "RF size", "RF jump")]
        hidden = 0 if constants else sum(n.constant for n in self.nodes)
        for n in self.nodes:
            if n.constant and not constants:
                continue
            shapes = "; ".join(s.shape_str() for s in n.output_specs) or "-"
            rf = next((n.receptive_fields[o] for o in n.outputs if o in n.receptive_fields), None)
            rows.append((n.name or "(unnamed)", n.op_type, ", ".join(n.outputs) or "-", shapes,
                         f"{n.parameter_count:,}" if n.parameter_count else "",
                         rf.size_str() if rf else "", rf.jump_str() if rf and not rf.global_ else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = {4}
        lines = []
        for k, r in enumerate(rows):
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        if hidden:
            lines.append(f"({hidden} constant node{'s' if hidden > 1 else ''} not shown: nodes that depend on no input "
                         "build weights or shapes; summary(constants=True) / `vis inspect --constants` lists them)")
        return "\n".join(head + lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class GradientResult:
    """Result of :meth:`Client.gradient`.

    ``gradients``: wrt name -> gradient array (same shape as that tensor);
    ``objective``: per-sample objective values; ``target_index``: the class index used per
    sample for output targets, the channel for channel / neuron targets (else ``None``);
    ``labels``: label names of a class ``target_index`` when the model has labels (else ``None``)."""
    gradients: dict[str, np.ndarray]
    objective: np.ndarray | None
    target_index: np.ndarray | None
    labels: list[str] | None
    result: Result = field(repr=False, default_factory=Result)

    @property
    def gradient(self) -> np.ndarray:
        """The gradient w.r.t. the first (usually only) ``wrt`` tensor."""
        if not self.gradients:
            raise KeyError("the result holds no gradient")
        return next(iter(self.gradients.values()))


# ----------------------------------------------------------------------------
# Request builders


class Target:
    """Builders for ``vis_pb2.Target`` (what :meth:`Client.gradient` differentiates).

    Per-sample indices: ``None`` = top-1 prediction of each sample, one int = the same
    for all samples, a list = one per sample."""

    @staticmethod
    def _indices(value, what: str) -> list[int]:
        if value is None:
            return []
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{what} must be an int or a list of ints, not bool")
        if isinstance(value, (int, np.integer)):
            return [check_int(value, what, None, INT64_MAX)]
        arr = np.asarray(value)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"{what} must be an int or a flat list of ints, got {value!r}")
        return [check_int(int(v), what, None, INT64_MAX) for v in arr]

    @classmethod
    def output(cls, index: int | Sequence[int] | None = None, output: str | None = None) -> vis_pb2.Target:
        """A graph output element (class logit/probability); ``output`` defaults to the first output."""
        return vis_pb2.Target(output=vis_pb2.OutputTarget(output=output or "",
                                                          index=cls._indices(index, "index")))

    @classmethod
    def channel(cls, layer: str, channel: int | Sequence[int] | None = None) -> vis_pb2.Target:
        """Sum of one channel of ``layer`` over all positions (``None`` = each sample's top channel:
        the one with the largest sum over all positions, ties to the lowest index)."""
        _check_name(layer, "layer")
        return vis_pb2.Target(channel=vis_pb2.ChannelTarget(layer=layer,
                                                            channel=cls._indices(channel, "channel")))

    @classmethod
    def neuron(cls, layer: str, channel: int, y: int, x: int) -> vis_pb2.Target:
        """One unit ``layer[:, channel, y, x]``; on a 2-D ``[N, C]`` layer ``y`` and ``x`` must be 0
        (on ``[N, C, H]``, ``x``)."""
        _check_name(layer, "layer")
        channel, y, x = (check_int(v, what, None, INT64_MAX) for v, what in ((channel, "channel"), (y, "y"), (x, "x")))
        return vis_pb2.Target(neuron=vis_pb2.NeuronTarget(layer=layer, channel=channel, y=y, x=x))

    @classmethod
    def tensor(cls, layer: str, cotangent) -> vis_pb2.Target:
        """``<layer, cotangent>``: the cotangent has the tensor's shape, with or without the batch
        dimension. Float64 cotangents are sent as FP32."""
        _check_name(layer, "layer")
        if cotangent is None:
            raise ValueError("Target.tensor needs a cotangent array")
        cot = np.asarray(cotangent)
        if cot.dtype == np.float64 or cot.dtype.kind in "iub":
            cot = cot.astype(np.float32)
        return vis_pb2.Target(tensor=vis_pb2.TensorTarget(layer=layer, cotangent=to_proto(layer, cot)))


def _check_name(value, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty string, got {value!r}")


def build_target(objective, cotangent=None) -> vis_pb2.Target:
    """Turn :meth:`Client.gradient`'s ``objective`` argument into a ``vis_pb2.Target``."""
    if isinstance(objective, vis_pb2.Target):
        if cotangent is not None:
            raise ValueError("cotangent is only used with a layer-name objective")
        return objective
    if isinstance(objective, str):
        if not objective:
            raise ValueError("objective layer name is empty")
        if cotangent is None:
            raise ValueError(f"objective / target {objective!r} is a layer name: give Client.gradient a cotangent=..., or use "
                             "Target.channel / Target.neuron")
        return Target.tensor(objective, cotangent)
    if cotangent is not None:
        raise ValueError("cotangent is only used with a layer-name objective")
    if isinstance(objective, (vis_pb2.OutputTarget, vis_pb2.ChannelTarget, vis_pb2.NeuronTarget,
                              vis_pb2.TensorTarget)):
        kind = {vis_pb2.OutputTarget: "output", vis_pb2.ChannelTarget: "channel",
                vis_pb2.NeuronTarget: "neuron", vis_pb2.TensorTarget: "tensor"}[type(objective)]
        return vis_pb2.Target(**{kind: objective})
    if objective is None or isinstance(objective, (int, np.integer, list, tuple, np.ndarray)):
        return Target.output(objective)
    raise TypeError("objective / target must be a class index, a list of class indices, None (top-1), a Target "
                    f"or a layer name with cotangent; got {type(objective).__name__}")


def build_preprocessing(preprocess) -> vis_pb2.Preprocessing | None:
    """``None`` | preset name | dict of InputConfig fields (may include ``"preset"``) |
    ``vis_pb2.Preprocessing`` / ``vis_pb2.InputConfig`` -> ``vis_pb2.Preprocessing``."""
    if preprocess is None:
        return None
    if isinstance(preprocess, vis_pb2.Preprocessing):
        return preprocess
    if isinstance(preprocess, vis_pb2.InputConfig):
        return vis_pb2.Preprocessing(config=preprocess)
    if isinstance(preprocess, str):
        if preprocess not in PRESETS:
            raise ValueError(f"unknown preprocessing preset {preprocess!r}; choose one of {', '.join(PRESETS)}")
        return vis_pb2.Preprocessing(preset=preprocess)
    if isinstance(preprocess, Mapping):
        fields = dict(preprocess)
        preset = fields.pop("preset", "") or ""
        if preset and preset not in PRESETS:
            raise ValueError(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)}")
        try:
            config = json_format.ParseDict(fields, vis_pb2.InputConfig())
        except json_format.ParseError as e:
            raise ValueError(f"bad preprocessing config: {e}") from None
        return vis_pb2.Preprocessing(preset=preset, config=config)
    raise TypeError(f"preprocess must be None, a preset name or a dict, got {type(preprocess).__name__}")


def _is_pil_image(obj) -> bool:
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "save") and hasattr(obj, "mode")


def _encode_image(item) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if not data:
            raise ValueError("empty image bytes")
        return data
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            if path.is_dir():
                raise IsADirectoryError(f"image file expected, got a directory: {path}")
            raise FileNotFoundError(f"image file not found: {path}")
        return path.read_bytes()
    if _is_pil_image(item):
        buf = io.BytesIO()
        img = item if item.mode in ("RGB", "RGBA", "L", "LA", "I;16", "P", "1") else item.convert("RGB")
        img.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(item, np.ndarray):
        raise TypeError("a list of numpy arrays is ambiguous: pass one stacked array (a raw batch tensor) "
                        "or images as file paths / PIL images / encoded bytes")
    raise TypeError(f"cannot use {type(item).__name__} as an image (expected a path, PIL image or bytes)")


def _input_dtype(model, name: str) -> str | None:
    if not isinstance(model, Model) or not model.inputs:
        return None
    for s in model.inputs:
        if s.name == name:
            return s.datatype
    return model.inputs[0].datatype if not name else None


#: raw inputs of an InputBatch whose bytes are not in the message yet: (index in ``tensors``, array)
DeferredInputs = list[tuple[int, np.ndarray]]


def _add_raw_tensor(batch: vis_pb2.InputBatch, name: str, arr, model, deferred: DeferredInputs | None = None) -> None:
    """Append one raw input, cast to the model input's float type where it is known.

    Built in place (``tensors.add``) so the payload is copied once into the message,
    not again by ``append``. With ``deferred`` (a list), a large input's bytes are left
    out and the contiguous little-endian array is appended to it instead: the call puts
    them in its shared memory region or, without one, in the message (``_send_inputs``)."""
    a = np.asarray(arr)
    if a.dtype == object:
        raise TypeError(f"input {name or '(first)'!r}: cannot send an object array")
    want = _input_dtype(model, name)
    if a.dtype.kind == "f":
        if want in ("FP32", "FP16", "FP64"):
            a = a.astype({"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}[want], copy=False)
        elif want is None and a.dtype == np.float64:
            a = a.astype(np.float32)
    if deferred is not None and a.nbytes >= INPUT_MIN_BYTES:
        datatype = datatype_of(a.dtype)
        a = np.ascontiguousarray(a, dtype=DATATYPES[datatype])
        deferred.append((len(batch.tensors), a))
        batch.tensors.add(name=name, datatype=datatype, shape=list(a.shape))
        return
    datatype, shape, data = encode(a)
    batch.tensors.add(name=name, datatype=datatype, shape=shape, raw_contents=data)


def _send_inputs(batch: vis_pb2.InputBatch, deferred: DeferredInputs, lease: RegionLease | None,
                 inline: bool = True) -> dict[int, np.ndarray]:
    """Give the deferred inputs their bytes: in the call's shared memory region where they fit
    (``in_shared_memory`` / ``shm_offset``), else in the message; with ``inline=False`` those are
    returned instead (tensor index -> array), for ``wire.request_with_payloads`` to write."""
    unplaced = {}
    for index, arr in deferred:
        t = batch.tensors[index]
        offset = lease.put(arr) if lease is not None else None
        if offset is not None:
            t.in_shared_memory = True
            t.shm_offset = offset
        elif inline:
            t.raw_contents = arr.tobytes()
        else:
            unplaced[index] = arr
    return unplaced


def build_input_batch(x, preprocess=None, model=None) -> vis_pb2.InputBatch:
    """Build a ``vis_pb2.InputBatch``.

    ``x`` is a numpy array (raw tensor for the model's single/first input), a dict
    input name -> array, or a list of images (file paths, PIL images or encoded bytes; a
    single one is accepted too); in a dict, images for the image input (under its name, or "")
    beside arrays for the model's other inputs. Float arrays are cast to the model input's float type when
    ``model`` is a :class:`Model`, else float64 is sent as FP32.
    """
    batch, deferred = _input_batch(x, preprocess, model)
    _send_inputs(batch, deferred, None)
    return batch


def _input_batch(x, preprocess=None, model=None) -> tuple[vis_pb2.InputBatch, DeferredInputs]:
    """:func:`build_input_batch` with the bytes of large raw inputs left for the call to place
    (see ``_send_inputs``)."""
    batch = vis_pb2.InputBatch()
    deferred: DeferredInputs = []
    image_key = ""
    if isinstance(x, vis_pb2.InputBatch):
        batch.CopyFrom(x)
    elif isinstance(x, np.ndarray):
        if x.ndim == 0:
            raise ValueError("input array must have a batch dimension, got a scalar")
        _add_raw_tensor(batch, "", x, model, deferred)
    elif isinstance(x, Mapping):
        if not x:
            raise ValueError("input dict is empty")
        for name, arr in x.items():
            if not isinstance(name, str):
                raise TypeError(f"input dict keys must be input names (str), got {name!r}")
            if _is_images(arr):  # image files for the image input, beside the model's other inputs
                if batch.images:
                    raise ValueError("images go to one input (the model's image input); got them for two keys")
                image_key = name
                batch.images.extend(_encode_image(item) for item in (arr if isinstance(arr, (list, tuple)) else [arr]))
            else:
                _add_raw_tensor(batch, name, arr, model, deferred)
    elif isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil_image(x):
        batch.images.append(_encode_image(x))
    elif isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("empty image list")
        batch.images.extend(_encode_image(item) for item in x)
    elif x is None:
        raise ValueError("no input given")
    else:
        raise TypeError(f"unsupported input {type(x).__name__}: pass a numpy array, a dict of arrays "
                        "or a list of image paths / PIL images / encoded bytes")
    pre = build_preprocessing(preprocess)
    if pre is not None:
        batch.preprocess.CopyFrom(pre)
    if image_key and not batch.preprocess.config.name:
        batch.preprocess.config.name = image_key  # the server checks that the images' input is its image input
    return batch, deferred


def _is_images(value) -> bool:
    """An image (a path, PIL image or encoded bytes) or a non-empty list of them."""
    def one(v):
        return isinstance(v, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_pil_image(v)
    if isinstance(value, (list, tuple)):
        return bool(value) and all(one(v) for v in value)
    return one(value)


def _model_ref(model) -> str:
    if isinstance(model, Model):
        return model.id
    if isinstance(model, str) and model:
        return model
    raise TypeError(f"model must be a Model, an id or a name, got {model!r}")


def _names(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (Sequence, np.ndarray, set, frozenset)):
        raise TypeError(f"{what} must be a name or a list of names, got {value!r}")
    out = list(value)
    for v in out:
        if not isinstance(v, str) or not v:
            raise TypeError(f"{what} must be non-empty strings, got {v!r}")
    return out


# ----------------------------------------------------------------------------
# Client


class Client(AttributionMixin, LocalizationMixin, OptimizationMixin):
    """Connection to a vis-service server.

    ``Client("127.0.0.1:50051", timeout=60)``. ``timeout`` (seconds) applies to every call,
    ``None`` = no deadline. Use as a context manager or call :meth:`close`.

    ``shared_memory_bytes`` > 0, only for a server on the same machine: the client creates
    shared memory regions of that size (a pool of at most ``shared_memory_regions``, made as
    needed). Each streamed call leases one: large raw inputs are written into it instead of
    the request, and the server writes result tensors into it instead of streaming them
    (much faster for large tensors; what does not fit travels through gRPC). **Results of
    such a client are numpy views into shared memory**: writable, owned by the caller, and
    nothing reuses that memory while any of them lives (the region goes back to the pool when
    the call's last result array is garbage; ``arr.copy()`` detaches one). A call that finds
    every region leased is streamed; a call that fails or is cancelled retires its region.
    :meth:`close` unlinks the regions (arrays still viewing one stay valid). A server on
    another host answers INVALID_ARGUMENT.

    Streamed calls return as soon as the closing ResultInfo has arrived; the OK status that
    follows is read during the client's next call, once its request is out (or by :meth:`close`).
    """

    def __init__(self, address: str, *, timeout: float | None = None, max_message_bytes: int = 64 * MiB,
                 shared_memory_bytes: int = 0, shared_memory_regions: int = 4):
        if not isinstance(address, str) or not address:
            raise ValueError("address must be 'host:port'")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        self.address = address
        self.timeout = timeout
        self.max_message_bytes = int(max_message_bytes)
        self._shared = (SharedResultMemory(shared_memory_bytes, shared_memory_regions)
                        if shared_memory_bytes else None)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # streamed answers are read on the calling thread, not handed over by gRPC's channel
            # thread: one thread wake-up less per message
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        ])
        self._unfinished = Unfinished()
        self._models = make_stub(self._channel, vis_pb2.DESCRIPTOR.services_by_name["ModelService"])
        self._vis = make_stub(self._channel, vis_pb2.DESCRIPTOR.services_by_name["VisService"])

    def shared_input(self, shape, dtype=np.float32) -> np.ndarray:
        """An array to fill with a call's input, living in one of this client's shared memory regions.

        Passed as a call's input (the array itself, or the first value of an input dict), it is
        sent where it lies: no copy into the region (Triton's system shared memory works the same
        way). Build batches in it directly, e.g. ``buf = client.shared_input((8, 3, 224, 224));
        buf[:] = images; client.activations(model, buf, layers)``. Its region serves only calls
        with this input while the array (or a view of it) lives; a call made while an earlier
        call's results still view that region copies the input elsewhere instead. Do not change
        the array during a call. Needs ``shared_memory_bytes``; RuntimeError when every region is
        in use, ValueError when it does not fit one.
        """
        if self._shared is None:
            raise RuntimeError("shared_input needs a Client made with shared_memory_bytes > 0")
        return self._shared.input_array(shape, dtype)

    # -- lifecycle

    def close(self) -> None:
        """Close the channel and unlink the shared memory regions (if any)."""
        self._closed = True
        self._unfinished.drain(cancel=True)
        self._channel.close()
        if self._shared is not None:
            self._shared.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):   # grpc's own "Cannot invoke RPC on closed channel!" named no client
            raise ValueError(f"this Client ({self.address}) is closed; make a new one")

    def _unary(self, method, request):
        self._check_open()
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    @contextmanager
    def _transport(self, first_input: np.ndarray | None = None) -> Iterator[RegionLease | None]:
        """The shared memory region leased for one streamed call, None when the call is streamed
        (no shared memory, or every region in use); the region of ``first_input`` when that is a
        free :meth:`shared_input` array. A call that raises retires its region."""
        lease = self._shared.lease(first_input) if self._shared is not None else None
        if lease is None:
            yield None
            return
        try:
            yield lease
        except BaseException:
            lease.retire()  # the server may still write into it: never hand it to another call
            raise
        finally:
            lease.end()

    def _stream(self, method, request, on_progress=None, cancel=None, inputs: DeferredInputs = (),
                tap=None) -> Result:
        """Make a streamed call and collect its result; ``inputs``: the request's deferred raw inputs
        (``_input_batch``), placed in the call's region where it has one; ``tap(call)``: an
        iterable over the call's messages to collect from instead (e.g. one that keeps snapshots)."""
        self._check_open()
        if on_progress is not None and not callable(on_progress):   # it failed mid-stream, or never
            raise TypeError(f"on_progress must be callable, got {on_progress!r}")
        with self._transport(inputs[0][1] if inputs else None) as lease:
            if inputs:
                unplaced = _send_inputs(request.input, inputs, lease, inline=False)
                if unplaced:
                    request = request_with_payloads(request, unplaced)  # the payloads copied once
            try:
                call = method(request, timeout=self.timeout, metadata=lease.metadata if lease else None)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            self._unfinished.drain()  # earlier calls' statuses, while the server works on this one
            messages = tap(call) if tap is not None else call
            if lease is None:
                return collect(messages, on_progress=on_progress, cancel=cancel, finish=self._unfinished.add)
            return collect(messages, on_progress=on_progress, cancel=cancel, region=lease.buffer, views=True,
                           reserved=lease.inputs_end, finish=self._unfinished.add)

    # -- server

    def server_info(self) -> dict:
        """``VisService.GetServerInfo`` as a dict with every ServerInfo field (version, provider,
        available_providers, provider_note, rule_sets, chunk_bytes, max_upload_bytes,
        max_request_bytes, model_repository, session counters, ...); lists for repeated fields."""
        info = self._unary(self._vis.GetServerInfo, vis_pb2.ServerInfoRequest())
        return {f.name: (list(getattr(info, f.name)) if _is_repeated(f) else getattr(info, f.name))
                for f in info.DESCRIPTOR.fields}

    # -- models

    def load_model(self, path_or_bytes: str | os.PathLike | bytes, name: str | None = None, *,
                   config: dict | vis_pb2.ModelConfig | None = None,
                   labels: Sequence[str] | None = None) -> Model:
        """Upload an ONNX model (a file path or its bytes) and return it.

        ``name`` defaults to the file name without ``.onnx`` (none for bytes, or where the
        server's repository has an entry of that name; the id always works). A name given
        to another upload moves to this one; a repository entry's name cannot be taken
        (ALREADY_EXISTS). ``config``: a dict of ModelConfig fields (e.g. ``{"preset": "imagenet"}``),
        ``labels``: class names. The file is streamed in 1 MiB chunks.
        """
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            data = bytes(path_or_bytes)
            if not data:
                raise ValueError("model bytes are empty")
            total = len(data)
            path = None
        elif isinstance(path_or_bytes, (str, os.PathLike)):
            path = Path(path_or_bytes)
            if not path.is_file():
                if path.is_dir():
                    raise IsADirectoryError(f"model file (.onnx) expected, got a directory: {path}")
                raise FileNotFoundError(f"model file not found: {path}")
            total = path.stat().st_size
            data = None
            if name is None:
                name = path.name[:-5] if path.name.endswith(".onnx") else path.stem
                if name in self.list_models()[1]:
                    # the server keeps repository names for repository models: a file that happens
                    # to share one is uploaded unnamed (reachable by its id) rather than refused
                    name = None
        else:
            raise TypeError(f"load_model expects a file path or bytes, got {type(path_or_bytes).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError("name must be a string")
        header = vis_pb2.UploadHeader(name=name or "", total_bytes=total)
        if config is not None:
            if isinstance(config, vis_pb2.ModelConfig):
                header.config.CopyFrom(config)
            elif isinstance(config, Mapping):
                try:
                    json_format.ParseDict(dict(config), header.config)
                except json_format.ParseError as e:
                    raise ValueError(f"bad model config: {e}") from None
            else:
                raise TypeError("config must be a dict of ModelConfig fields")
        if labels is not None:
            if isinstance(labels, str):
                raise TypeError("labels must be a list of strings, not one string")
            header.labels.extend(str(v) for v in labels)

        def requests() -> Iterator[vis_pb2.UploadRequest]:
            yield vis_pb2.UploadRequest(header=header)
            if data is not None:
                for i in range(0, len(data), UPLOAD_CHUNK_BYTES):
                    yield vis_pb2.UploadRequest(chunk=data[i:i + UPLOAD_CHUNK_BYTES])
            else:
                with open(path, "rb") as f:
                    while chunk := f.read(UPLOAD_CHUNK_BYTES):
                        yield vis_pb2.UploadRequest(chunk=chunk)

        info = self._unary(self._models.Upload, requests())
        return Model.from_proto(info, self)

    def list_models(self) -> tuple[list[Model], list[str]]:
        """``(loaded models, loadable names in the server's model repository)``."""
        resp = self._unary(self._models.List, vis_pb2.ListRequest())
        return [Model.from_proto(m, self) for m in resp.loaded], list(resp.repository)

    def model(self, name_or_id: str | Model) -> Model:
        """A loaded model by id or name; otherwise load ``name_or_id`` from the server's
        model repository (``ModelService.Load``)."""
        if isinstance(name_or_id, Model):
            if name_or_id.client is None:
                name_or_id.client = self
            elif name_or_id.client is not self:   # a model of another client, e.g. a closed one
                return dataclasses.replace(name_or_id, client=self)
            return name_or_id
        _check_name(name_or_id, "model name")
        loaded, _ = self.list_models()
        for m in loaded:
            if name_or_id == m.id or name_or_id in m.names:
                return m
        info = self._unary(self._models.Load, vis_pb2.LoadRequest(name=name_or_id))
        return Model.from_proto(info, self)

    def reload(self, name: str) -> Model:
        """``ModelService.Load`` of a repository entry's name, loaded or not: the server reads its
        files again (after they changed; ``model(name)`` returns what is loaded). The name then
        denotes the new content's model; the old one stays loaded under its id until unloaded."""
        _check_name(name, "model name")
        return Model.from_proto(self._unary(self._models.Load, vis_pb2.LoadRequest(name=name)), self)

    def unload(self, model: ModelRef) -> bool:
        """Unload a model; True if it was loaded, False for a repository entry that is not;
        NotFound for a name or id the server does not know (an uploaded model once unloaded)."""
        resp = self._unary(self._models.Unload, vis_pb2.ModelRequest(model=_model_ref(model)))
        return bool(resp.unloaded)

    def inspect(self, model: ModelRef) -> Inspection:
        """Graph structure: nodes with output shapes, parameter counts and receptive fields."""
        resp = self._unary(self._models.Inspect, vis_pb2.ModelRequest(model=_model_ref(model)))
        return Inspection(model=Model.from_proto(resp.model, self),
                          nodes=[NodeInfo.from_proto(n) for n in resp.nodes],
                          parameter_count=int(resp.parameter_count), opset=int(resp.opset),
                          ir_version=int(resp.ir_version), producer=resp.producer,
                          receptive_fields_at=tuple(int(v) for v in resp.receptive_fields_at),
                          receptive_fields_note=resp.receptive_fields_note)

    # -- analysis

    def activations(self, model: ModelRef, x, layers: str | Sequence[str] = (), *, preprocess=None,
                    on_progress: ProgressFn | None = None, cancel=None) -> dict[str, np.ndarray]:
        """Activations of ``layers`` (tensor or node names; empty = graph outputs) for input
        ``x`` (see :func:`build_input_batch`); ``preprocess``: None (model config), a preset
        name or a dict of InputConfig fields. Returns layer name -> array (batch first)."""
        return self.activations_result(model, x, layers, preprocess=preprocess, on_progress=on_progress,
                                       cancel=cancel).tensors

    def activations_result(self, model: ModelRef, x, layers: str | Sequence[str] = (), *, preprocess=None,
                           on_progress: ProgressFn | None = None, cancel=None) -> Result:
        """:meth:`activations` as the whole answer: ``.tensors`` (layer -> array), ``.labels``:
        for layers that hold class scores or probabilities (the class scores, graph outputs) of a
        model with labels, one label name per entry, and ``.layouts``: "NCHW" or "NHWC" for the
        4-D feature maps whose axes the server traced (a channels-last model's are [N, H, W, C])."""
        batch, inputs = _input_batch(x, preprocess, model)
        req = vis_pb2.ActivationsRequest(model=_model_ref(model), input=batch, layers=_names(layers, "layers"))
        return self._stream(self._vis.Activations, req, on_progress, cancel, inputs)

    def filters(self, model: ModelRef, layer: str, *, on_progress: ProgressFn | None = None,
                cancel=None) -> dict[str, np.ndarray]:
        """Weights of a Conv / ConvTranspose / Gemm / MatMul layer: ``{"weight": ..., "bias": ...}``
        (``"bias"`` only when the layer has one)."""
        _check_name(layer, "layer")
        req = vis_pb2.FiltersRequest(model=_model_ref(model), layer=layer)
        return self._stream(self._vis.Filters, req, on_progress, cancel).tensors

    def gradient(self, model: ModelRef, x, objective=None, wrt: str | Sequence[str] = "input",
                 rule_set: str = "gradient", cotangent=None, *, node_rules: Mapping[str, str] | None = None,
                 memory_budget_bytes: int = 0, preprocess=None, on_progress: ProgressFn | None = None,
                 cancel=None) -> GradientResult:
        """Gradient of an objective w.r.t. the input (or other tensors).

        ``objective``: a class index (same for all samples), a list of class indices (one per
        sample), ``None`` (top-1 prediction per sample), a ``Target.*`` message, or a layer name
        together with ``cotangent`` (objective = <layer, cotangent>).
        ``wrt``: "input" (the image input) or tensor / node names. ``rule_set``: "gradient",
        "deconvnet", "guided", "redirected" (see ``server_info()["rule_sets"]``); ``node_rules`` overrides it
        per node name. ``memory_budget_bytes`` (default 2 GiB) bounds the samples per onnxruntime
        run: a larger batch runs in several, reported through ``on_progress``.
        """
        if not isinstance(rule_set, str):
            raise TypeError("rule_set must be a string")
        wrt_names = _names(wrt, "wrt") or ["input"]
        rules = {}
        for k, v in (node_rules or {}).items():
            if not isinstance(k, str) or not isinstance(v, str) or not k or not v:
                raise TypeError("node_rules must map node names to rule set names")
            rules[k] = v
        batch, inputs = _input_batch(x, preprocess, model)
        req = vis_pb2.GradientRequest(model=_model_ref(model), input=batch,
                                      target=build_target(objective, cotangent), wrt=wrt_names,
                                      rule_set=rule_set, node_rules=rules,
                                      memory_budget_bytes=check_int(memory_budget_bytes, "memory_budget_bytes", 0, INT64_MAX))
        res = self._stream(self._vis.Gradient, req, on_progress, cancel, inputs)
        grads = {k[len("grad/"):]: v for k, v in res.tensors.items() if k.startswith("grad/")}
        # keep the requested order
        order = {n: i for i, n in enumerate(wrt_names)}
        grads = dict(sorted(grads.items(), key=lambda kv: order.get(kv[0], len(order))))
        return GradientResult(gradients=grads, objective=res.tensors.get("objective"),
                              target_index=res.tensors.get("target_index"),
                              labels=res.labels.get("target_index"), result=res)
