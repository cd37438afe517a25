"""Activations: any set of tensors of a model, computed in one onnxruntime run.

Exactly the requested tensors are exposed as outputs (exposing more blocks ORT's
fusions); the session for that set is cached, so repeated requests only run.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ..datatypes import NUMPY_BY_DATATYPE, datatype_of
from ..errors import InvalidArgument, ResourceExhausted
from ..graph.expose import expose_tensors, exposed_name
from ..graph.loading import BATCH_DIM
from ..graph.names import resolve_tensor
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from . import limits
from .targets import class_scores_tensor, layout_of

log = logging.getLogger(__name__)


def resolve_layers(model: LoadedModel, layers: list[str], field: str = "layers") -> dict[str, str]:
    """Requested name (tensor or node) -> tensor name; empty = the graph outputs. Tensors of a type
    no result can carry (uint16, strings, float8, ...) are refused naming `field`."""
    resolved = ({o: o for o in model.output_names} if not layers
                else {name: resolve_tensor(model.proto, name, kind="layer") for name in layers})
    for name, tensor in resolved.items():
        info = model.infos.get(tensor)
        if info is None:
            continue
        try:
            datatype_of(info.dtype)
        except (TypeError, ValueError, KeyError):
            raise InvalidArgument(field, f"tensor {tensor!r} ({name!r}) is of ONNX type "
                                         f"{onnx.TensorProto.DataType.Name(info.elem_type)}, which results cannot carry; "
                                         f"allowed: {', '.join(NUMPY_BY_DATATYPE)}") from None
    return resolved


def exposed_session(runtime: Runtime, model: LoadedModel, tensors):
    """Cached session whose outputs are exactly `tensors` (order-independent key)."""
    key_tensors = tuple(sorted(set(tensors)))
    return runtime.session(model.graph_id, ("expose", key_tensors),
                           lambda: (expose_tensors(model.proto, list(key_tensors)), None))


# where the caller wants the results: (dtype, shape) of every result -> one writable C-contiguous
# array per result, or None to have them allocated as usual (e.g. they do not all fit)
OutputAllocator = Callable[[list[tuple[np.dtype, tuple[int, ...]]]], "list[np.ndarray] | None"]

_PLANS_PER_MODEL = 64


@dataclass(frozen=True)
class _Plan:
    """What a layer list means for a model, worked out once (resolving names walks the graph)."""
    resolved: dict[str, str]            # requested name -> tensor
    outputs: list[str]                  # exposed output names, one per distinct tensor
    by_name: dict[str, str]             # requested name -> exposed output name
    # (dtype, shape with None for the batch dimension) per output; None when a shape is not known
    # before the run, or its dtype has no numpy equivalent
    specs: list[tuple[np.dtype, tuple[int | None, ...]]] | None


_plans_lock = threading.Lock()


def _plan(model: LoadedModel, layers: list[str]) -> _Plan:
    key = tuple(layers)
    with _plans_lock:
        plans = model.memo("activation_plans", OrderedDict)
        plan = plans.get(key)
        if plan is not None:
            plans.move_to_end(key)
            return plan
    resolved = resolve_layers(model, layers)  # NotFound for an unknown name: nothing is kept
    tensors = list(dict.fromkeys(resolved.values()))
    exposed = {t: exposed_name(model.proto, t) for t in tensors}
    plan = _Plan(resolved, [exposed[t] for t in tensors], {n: exposed[t] for n, t in resolved.items()},
                 _result_specs(model, tensors))
    with _plans_lock:
        plans[key] = plan
        while len(plans) > _PLANS_PER_MODEL:
            plans.popitem(last=False)
    return plan


def compute_activations(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray],
                        layers: list[str], allocate: OutputAllocator | None = None) -> dict[str, np.ndarray]:
    """Requested name -> activation. With `allocate` (e.g. the call's shared memory region), results
    whose shapes are known before the run are written by onnxruntime straight into the arrays it
    gives, sparing an allocation and a copy per result."""
    plan = _plan(model, list(layers))
    x = feeds.get(model.image_input)
    _check_result_size(plan, x)
    session = exposed_session(runtime, model, plan.resolved.values())
    values = None
    if allocate is not None and plan.specs is not None and x is not None and x.ndim:
        batch = x.shape[0]
        arrays = allocate([(dtype, tuple(batch if d is None else d for d in shape)) for dtype, shape in plan.specs])
        if arrays is not None:
            try:
                values = session.run_into(dict(zip(plan.outputs, arrays)), feeds)
            except Exception:  # noqa: BLE001 - an inferred shape onnxruntime disagrees with: run as usual
                log.debug("run into preallocated outputs failed; running with allocated outputs", exc_info=True)
    if values is None:
        values = session.run_dict(plan.outputs, feeds)
    return {name: values[out] for name, out in plan.by_name.items()}


def _check_result_size(plan: _Plan, x: np.ndarray | None) -> None:
    """RESOURCE_EXHAUSTED before running when the results (known shapes) would take more than a
    quarter of the machine's memory: the server holds them all until streamed (every layer of a
    VGG for 256 images is ~15 GB; the kernel would kill the server)."""
    if plan.specs is None or x is None or not x.ndim:
        return
    batch = x.shape[0]
    total = sum(int(np.prod([batch if d is None else d for d in shape], dtype=np.int64)) * np.dtype(dtype).itemsize
                for dtype, shape in plan.specs)
    limit = limits.physical_memory_bytes() // 4
    if total > limit:
        raise ResourceExhausted(f"layers: the {len(plan.specs)} requested tensors take {total / limits.GiB:.1f} GiB "
                                f"for {batch} images, over the server's {limit / limits.GiB:.1f} GiB for one result "
                                "(a quarter of its memory); request fewer layers or images per call")


def _result_specs(model: LoadedModel, tensors: list[str]):
    """(dtype, shape) of each tensor from the inferred shapes, None standing for the batch dimension
    (the symbol every input's first dimension has); None when any other dimension is not known."""
    specs = []
    for t in tensors:
        info = model.infos.get(t)
        if info is None or info.shape is None:
            return None
        shape = []
        for d in info.shape:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif d == BATCH_DIM:
                shape.append(None)
            else:
                return None
        try:
            dtype = info.dtype
        except Exception:  # noqa: BLE001 - a type numpy has no dtype for
            return None
        specs.append((dtype, tuple(shape)))
    return specs


def class_labels(model: LoadedModel, values: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Label names for the requested layers that hold class scores or probabilities (the class
    scores tensor, a graph output) as one vector per sample of the labels' length: name -> one
    name per entry ("" where the labels file has none). Other tensors of that length (pooled
    features) get none: their channels are not classes."""
    if not model.labels:
        return {}
    classes = {class_scores_tensor(model), *model.output_names}
    named = {}
    for name, arr in values.items():
        if arr.ndim < 2 or resolve_layers(model, [name]).get(name) not in classes:
            continue
        size = int(np.prod(arr.shape[1:]))
        if size == max(arr.shape[1:]) and any(model.label(i) for i in range(size)):
            named[name] = [model.label(i) or "" for i in range(size)]
    return named


def layouts(model: LoadedModel, values: dict[str, np.ndarray]) -> dict[str, str]:
    """Requested name -> "NCHW" or "NHWC" for the rank-4 results whose axes are traced from the image
    input: a channels-last model's maps (Keras via tf2onnx, a ConvNeXt block) are [N, H, W, C], which a
    client reading axis 1 as the channels drew as H maps of W x C."""
    resolved = _plan(model, list(values)).resolved   # resolved once per layer list, as the run's
    found = {}
    for name, arr in values.items():
        layout = layout_of(model, resolved[name]) if np.ndim(arr) == 4 else None
        if layout is not None:
            found[name] = layout
    return found
