"""Gradients of an objective w.r.t. the input or any tensor, under a rule set.

The objective is <tensor, cotangent> for one tensor of the model; `Objective`
says how the cotangent is made (class index, channel, neuron, or given). The
engine builds the backward graph once per (model, objective tensor, wrt, rule
set); the runtime caches its session.

Every run's results are checked for inf / NaN (`require_finite`): the server only takes
finite inputs, so a non-finite value means the network overflowed float32 on the input
(e.g. pixels of 3e38), and a map made of NaN would answer nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from onnx import TensorProto, helper

from ..engine.backward import GradientGraph, build_gradient_model
from ..errors import InvalidArgument
from ..graph.loading import BATCH_DIM, free_input_axes, with_static_sizes
from ..graph.names import resolve_tensor
from ..graph.receptive_field import image_input
from ..models.inputs import all_finite, static_sizes
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from . import batching, limits
from .activations import compute_activations
from .progress import NO_PROGRESS, Progress
from .targets import class_scores_tensor, require_activation, require_channels_first, top_channels

INPUT_ALIAS = "input"


@dataclass
class Objective:
    """What to differentiate: kind is "output", "channel", "neuron" or "tensor"."""

    kind: str = "output"
    layer: str = ""                       # output name / layer; "" = first graph output
    index: Sequence[int] = ()             # output: flat class index per sample (empty = top-1)
    channel: Sequence[int] = ()           # channel: per-sample rule as index (empty: top channel); neuron: [c]
    position: tuple[int, int] = (0, 0)    # neuron: (y, x)
    cotangent: np.ndarray | None = None   # tensor: given cotangent


@dataclass
class GradientResult:
    gradients: dict[str, np.ndarray]      # wrt (as requested) -> gradient
    objective: np.ndarray                 # per-sample <objective tensor, cotangent>
    target_index: np.ndarray | None = None
    objective_tensor: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


def resolve_wrt(model: LoadedModel, wrt: Sequence[str]) -> dict[str, str]:
    """Requested wrt name -> tensor; "input" means the image input, always: also where another tensor
    of the graph is named "input" (a normalization built into the graph, a Transpose of an NHWC
    input), which every attribution method would otherwise be taken with respect to, silently
    (that tensor is still reachable by the name of the node that makes it)."""
    wrt = list(wrt) or [INPUT_ALIAS]
    out = {}
    for name in wrt:
        if name == INPUT_ALIAS:
            out[name] = model.image_input
        else:
            out[name] = resolve_tensor(model.proto, name, kind="wrt tensor")
    return out


def specialized_proto(model: LoadedModel, sizes: tuple):
    """The model's graph with `sizes` (models.inputs.static_sizes) fixed: the graph to build gradients
    on. A gradient graph needs static sizes (see graph.loading.with_static_sizes): a model whose image
    size is free gets one graph, and session, per size it is run at."""
    if not sizes:
        return model.proto
    return with_static_sizes(model.proto, {name: dict(axes) for name, axes in sizes})


def gradient_session(runtime: Runtime, model: LoadedModel, objective_tensor: str, wrt_tensors: Sequence[str],
                     rule_set: str = "gradient", node_rules: Mapping[str, str] | None = None,
                     forward_outputs: Sequence[str] = (), top1: bool = False, batch_summed: bool = False,
                     sizes: tuple = ()):
    """Cached session of the forward+backward graph; `session.meta` is the GradientGraph.

    `sizes`: the free input sizes of the run (models.inputs.static_sizes), for a model whose image size is free.

    `batch_summed`: the wrt gradients come out summed over the batch ([1, ...]; see
    build_gradient_model), for methods that add up many rows of one image.

    `top1`: the cotangent is not fed but made in the graph: one-hot at each sample's
    largest entry of the objective tensor, so a "top-1 class" target costs one run,
    not a forward run to find the class and then the gradient run.
    """
    rules = tuple(sorted((node_rules or {}).items()))
    key = ("gradient", (objective_tensor,), tuple(wrt_tensors), rule_set, rules, tuple(forward_outputs), top1,
           batch_summed) + ((sizes,) if sizes else ())

    def build():
        gg = build_gradient_model(specialized_proto(model, sizes), [objective_tensor], list(wrt_tensors),
                                  rule_set=rule_set,
                                  node_rules=dict(rules), forward_outputs=list(forward_outputs),
                                  batch_summed=list(wrt_tensors) if batch_summed else ())
        if top1:
            _cotangent_from_top1(gg, objective_tensor)
        return gg.model, gg

    return runtime.session(model.graph_id, key, build)


def top1_output(gg: GradientGraph, tensor: str) -> str:
    return gg.cotangent_inputs[tensor] + "__top1"


def _cotangent_from_top1(gg: GradientGraph, tensor: str) -> None:
    """Replace the cotangent input of `tensor` by OneHot(ArgMax) of the tensor itself (in place).

    ArgMax picks the first of tied maxima, like numpy's argmax. The per-sample index is
    a new output, `top1_output(gg, tensor)`.
    """
    g = gg.model.graph
    cot = gg.cotangent_inputs[tensor]
    info = next(i for i in g.input if i.name == cot)
    g.input.remove(info)
    value = gg.forward_outputs[tensor]  # the objective is always a forward output
    p = f"{cot}__top1/"
    elem = info.type.tensor_type.elem_type
    # OneHot in float32 (onnxruntime has no double OneHot), cast to the cotangent's type
    zero_one = helper.make_tensor(p + "values", TensorProto.FLOAT, [2], [0.0, 1.0])
    g.node.extend([
        helper.make_node("Flatten", [value], [p + "flat"], axis=1),
        helper.make_node("ArgMax", [p + "flat"], [p + "index"], axis=1, keepdims=1),
        helper.make_node("Shape", [p + "flat"], [p + "flat_shape"]),
        helper.make_node("Constant", [], [p + "one"], value=helper.make_tensor(p + "one_v", TensorProto.INT64, [1], [1])),
        helper.make_node("Gather", [p + "flat_shape", p + "one"], [p + "depth"], axis=0),
        helper.make_node("Constant", [], [p + "values"], value=zero_one),
        helper.make_node("OneHot", [p + "index", p + "depth", p + "values"], [p + "onehot"], axis=-1),
        helper.make_node("Cast", [p + "onehot"], [p + "typed"], to=elem),
        helper.make_node("Shape", [value], [p + "shape"]),
        helper.make_node("Reshape", [p + "typed", p + "shape"], [cot]),
        helper.make_node("Squeeze", [p + "index"] + ([p + "axes"] if _opset(gg) >= 13 else []),
                         [top1_output(gg, tensor)], **({} if _opset(gg) >= 13 else {"axes": [1]})),
    ])
    if _opset(gg) >= 13:
        g.node.insert(len(g.node) - 1, helper.make_node(
            "Constant", [], [p + "axes"], value=helper.make_tensor(p + "axes_v", TensorProto.INT64, [1], [1])))
    g.output.append(helper.make_tensor_value_info(top1_output(gg, tensor), TensorProto.INT64, [None]))


def _opset(gg: GradientGraph) -> int:
    return next(o.version for o in gg.model.opset_import if o.domain in ("", "ai.onnx"))


def _per_sample(values: Sequence[int], batch: int, field: str) -> np.ndarray | None:
    values = [int(v) for v in values]
    if not values:
        return None
    if len(values) == 1:
        return np.full(batch, values[0], dtype=np.int64)
    if len(values) != batch:
        raise InvalidArgument(field, f"give one value or one per sample ({batch}), got {len(values)}")
    return np.asarray(values, dtype=np.int64)


def objective_tensor_name(model: LoadedModel, obj: Objective) -> str:
    if obj.kind == "output":
        if not obj.layer:
            return class_scores_tensor(model)
        tensor = resolve_tensor(model.proto, obj.layer, kind="output")
        require_activation(model, tensor, "target.output.output", obj.layer, differentiable=True)
        return tensor
    if not obj.layer:
        raise InvalidArgument("target.layer", "required for channel, neuron and tensor targets")
    tensor = resolve_tensor(model.proto, obj.layer, kind="layer")
    require_activation(model, tensor, f"target.{obj.kind}.layer", obj.layer, differentiable=True)
    return tensor


def positions_phrase(spatial_dims: int) -> str:
    """How a layer with `spatial_dims` spatial dims takes (y, x), for errors on unused coordinates."""
    return "is 2-D [N, C]: no spatial positions" if spatial_dims == 0 else "has one spatial dim (y)"


def require_finite(what: str, values: np.ndarray, field: str = "input",
                   fix: str = "scale the input into the model's value range") -> None:
    """INVALID_ARGUMENT on `field` when a result computed from (finite) inputs holds inf or NaN.

    Only results are checked (one BLAS pass over each, no extra run; see models.inputs.all_finite):
    `what` names the tensor, `fix` what to do."""
    if values.dtype.kind in "fc" and not all_finite(values):
        raise InvalidArgument(field, f"the network overflowed float32 on this {field.split('.')[-1]}: non-finite "
                                     f"values (inf or NaN) in {what}; {fix}")


def _batch_of(model: LoadedModel, feeds: dict[str, np.ndarray]) -> int:
    x = feeds.get(model.image_input)
    if x is None or x.ndim == 0:
        x = next((v for v in feeds.values() if v.ndim), None)
    if x is None:
        raise InvalidArgument("input", "no input has a batch dimension; targets are taken per sample of [N, ...] "
                                       "tensors")
    return int(x.shape[0])


def require_per_sample(tensor: str, shape, batch: int) -> None:
    """INVALID_ARGUMENT on `target` unless `tensor` has the inputs' batch as its first dimension:
    class, channel and neuron targets pick entries per sample (a scalar, or a tensor whose first
    dimension is something else, was an IndexError or a silently reshaped cotangent)."""
    first = shape[0] if shape is not None and len(shape) else None
    if shape is not None and (len(shape) == 0 or (isinstance(first, int) and first != batch)):
        raise InvalidArgument("target", f"tensor {tensor!r} of shape {list(shape)} has no batch dimension of the "
                                        f"inputs' {batch} samples; targets are taken per sample of [N, ...] tensors")


def _objective_shape(runtime, model, feeds, tensor: str, batch: int) -> tuple[int, ...]:
    shape = model.infos[tensor].shape if tensor in model.infos else None
    if shape is not None and all(isinstance(d, int) or d == BATCH_DIM for d in shape):
        return tuple(batch if d == BATCH_DIM else int(d) for d in shape)
    return compute_activations(runtime, model, feeds, [tensor])[tensor].shape


def make_cotangent(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray], obj: Objective,
                   tensor: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The cotangent for `obj` (and the per-sample target index for output targets)."""
    batch = _batch_of(model, feeds)
    shape = _objective_shape(runtime, model, feeds, tensor, batch)
    require_per_sample(tensor, shape, batch)
    dtype = model.infos[tensor].dtype if tensor in model.infos else np.float32
    cot = np.zeros(shape, dtype=dtype)
    if obj.kind == "output":
        per_sample = int(np.prod(shape[1:], dtype=np.int64))
        idx = _per_sample(obj.index, batch, "target.output.index")
        if idx is None:
            values = compute_activations(runtime, model, feeds, [tensor])[tensor]
            idx = values.reshape(batch, -1).argmax(axis=1).astype(np.int64)
        if (idx < 0).any() or (idx >= per_sample).any():
            raise InvalidArgument("target.output.index", f"must be in [0, {per_sample}) for output {tensor!r} of shape {list(shape)}")
        cot.reshape(batch, -1)[np.arange(batch), idx] = 1
        return cot, idx
    if obj.kind in ("channel", "neuron"):
        if len(shape) < 2:
            raise InvalidArgument("target.layer", f"tensor {tensor!r} of shape {list(shape)} has no channel axis")
        require_channels_first(model, tensor, f"target.{obj.kind}.layer", obj.layer)
        ch = _per_sample(obj.channel, batch, f"target.{obj.kind}.channel")
        if ch is None and obj.kind == "channel":  # each sample's top channel, as for a top-1 output target
            values = compute_activations(runtime, model, feeds, [tensor])[tensor]
            require_finite(f"tensor {tensor!r}", values)
            ch = top_channels(values)
        if ch is None:
            raise InvalidArgument(f"target.{obj.kind}.channel", "required")
        if (ch < 0).any() or (ch >= shape[1]).any():
            raise InvalidArgument(f"target.{obj.kind}.channel", f"must be in [0, {shape[1]}) for {tensor!r} of shape {list(shape)}")
        if obj.kind == "channel":
            cot[np.arange(batch), ch] = 1
            return cot, ch
        spatial = shape[2:]
        given = tuple(int(p) for p in obj.position)
        if len(spatial) > len(given):
            raise InvalidArgument("target.neuron.layer", f"{tensor!r} of shape {list(shape)} has {len(spatial)} "
                                                         "spatial dims; neuron targets take a layer [N, C], [N, C, H] "
                                                         "or [N, C, H, W]")
        for name, p, s in zip(("y", "x"), given, spatial):
            if not 0 <= p < s:
                raise InvalidArgument(f"target.neuron.{name}", f"must be in [0, {s}) for {tensor!r} of shape "
                                                               f"{list(shape)}, got {p}")
        for name, p in list(zip(("y", "x"), given))[len(spatial):]:
            # a 2-D [N, C] layer has one unit per channel: a position there would be silently ignored
            if p != 0:
                raise InvalidArgument(f"target.neuron.{name}", f"must be 0: {tensor!r} of shape {list(shape)} "
                                                               f"{positions_phrase(len(spatial))}, got {p}")
        pos = given[: len(spatial)]
        cot[(np.arange(batch), ch) + tuple(np.full(batch, p) for p in pos)] = 1
        return cot, ch
    if obj.kind == "tensor":
        if obj.cotangent is None:
            raise InvalidArgument("target.tensor.cotangent", "required")
        c = np.asarray(obj.cotangent)
        if c.shape == tuple(shape[1:]):
            c = np.broadcast_to(c, shape)
        if c.shape != tuple(shape):
            raise InvalidArgument("target.tensor.cotangent", f"shape {list(c.shape)} not allowed; tensor {tensor!r} has shape {list(shape)} (batch dim optional)")
        if not np.isfinite(c).all():
            raise InvalidArgument("target.tensor.cotangent", "contains NaN or Inf")
        return np.ascontiguousarray(c, dtype=dtype), None
    raise InvalidArgument("target", f"unknown target kind {obj.kind!r}; allowed: output, channel, neuron, tensor")


def compute_gradient(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray], obj: Objective,
                     wrt: Sequence[str] = (INPUT_ALIAS,), rule_set: str = "gradient",
                     node_rules: Mapping[str, str] | None = None, forward_outputs: Sequence[str] = (), *,
                     rows_per_run: int | None = None, progress: Progress = NO_PROGRESS) -> GradientResult:
    """The gradient of `obj` for every sample of `feeds`.

    `rows_per_run`: at most that many samples per onnxruntime run (a bound on the run's memory,
    see attribution_common.rows_per_run), the results joined, with `progress` after each run;
    None: one run. Runs split only where every tensor involved is batch-major."""
    tensor = objective_tensor_name(model, obj)
    wrt_map = resolve_wrt(model, wrt)
    top1 = obj.kind == "output" and not obj.index  # top-1 target: found inside the gradient run
    cot, target_index = (None, None) if top1 else make_cotangent(runtime, model, feeds, obj, tensor)
    runs = _row_runs(model, feeds, [tensor, *wrt_map.values(), *forward_outputs], rows_per_run)
    if runs is None:
        return run_gradient(runtime, model, feeds, tensor, cot, wrt_map, rule_set, node_rules, forward_outputs,
                            target_index)
    total = runs[-1].stop
    rows = batching.row_inputs(model, feeds)
    progress.update(0, total, "samples")
    parts = []
    for sl in runs:
        part = {k: (v[sl] if k in rows else v) for k, v in feeds.items()}
        parts.append(run_gradient(runtime, model, part, tensor, None if cot is None else cot[sl], wrt_map, rule_set,
                                  node_rules, forward_outputs, None if target_index is None else target_index[sl]))
        progress.update(sl.stop, total, "samples")
    joined = parts[0]
    return GradientResult({k: np.concatenate([p.gradients[k] for p in parts]) for k in joined.gradients},
                          np.concatenate([p.objective for p in parts]),
                          None if joined.target_index is None else np.concatenate([p.target_index for p in parts]),
                          tensor, {k: np.concatenate([p.outputs[k] for p in parts]) for k in joined.outputs})


def _row_runs(model: LoadedModel, feeds: dict[str, np.ndarray], tensors: Sequence[str],
              rows_per_run: int | None) -> list[slice] | None:
    """Row ranges of at most `rows_per_run` samples, evenly sized; None for one run: few enough
    rows, a model with a fixed batch, or a tensor whose first dim is not the batch (its values
    would not split by sample)."""
    batch = _batch_of(model, feeds)
    if rows_per_run is None or batch <= rows_per_run or batching.fixed_batch(model):
        return None
    for t in tensors:
        info = model.infos.get(t)
        if info is None or not info.shape or info.shape[0] != BATCH_DIM:
            return None
    return list(batching.chunks(batch, batching.balanced_chunk(batch, rows_per_run)))


def run_gradient(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray], tensor: str,
                 cotangent: np.ndarray | None, wrt_map: Mapping[str, str], rule_set: str = "gradient",
                 node_rules: Mapping[str, str] | None = None, forward_outputs: Sequence[str] = (),
                 target_index: np.ndarray | None = None, batch_summed: bool = False) -> GradientResult:
    """One run of the cached gradient graph for a given cotangent of `tensor`.

    `batch_summed`: each gradient is the sum over the batch's rows, shaped [1, ...].

    `cotangent=None`: each sample's top-1 entry of `tensor` (one-hot, made in the graph);
    the result's `target_index` then holds those entries.
    """
    wrt_tensors = list(dict.fromkeys(wrt_map.values()))
    top1 = cotangent is None
    info = model.infos.get(tensor)
    if top1 and info is not None:   # (a given cotangent was checked against the tensor's shape)
        require_per_sample(tensor, info.shape, _batch_of(model, feeds))
    elif info is not None and info.shape is not None and len(info.shape) == 0:
        raise InvalidArgument("target", f"tensor {tensor!r} is a scalar; gradients are taken of [N, ...] tensors, "
                                        "one objective per sample")
    session = gradient_session(runtime, model, tensor, wrt_tensors, rule_set, node_rules, forward_outputs, top1,
                               batch_summed, static_sizes(model, {k: v.shape for k, v in feeds.items()}))
    gg: GradientGraph = session.meta
    run_feeds = {k: v for k, v in feeds.items() if k in session.input_names}
    names = [gg.gradient_outputs[t] for t in wrt_tensors] + [gg.forward_outputs[tensor]]
    names += [gg.forward_outputs[t] for t in forward_outputs if gg.forward_outputs[t] not in names]
    if top1:
        names.append(top1_output(gg, tensor))
    else:
        run_feeds[gg.cotangent_inputs[tensor]] = cotangent
    values = session.run_dict(list(dict.fromkeys(names)), run_feeds)
    grads = {req: values[gg.gradient_outputs[t]] for req, t in wrt_map.items()}
    obj_values = values[gg.forward_outputs[tensor]]
    # the forward tensors first: where they overflow, the gradients follow
    for t in dict.fromkeys([tensor, *forward_outputs]):
        require_finite(f"tensor {t!r}", values[gg.forward_outputs[t]])
    for req, g in grads.items():   # a finite forward: the backward pass overflowed, from the cotangent's size
        require_finite(f"the gradient w.r.t. {req!r}", g, "target",
                       "scale the target's cotangent (with a finite forward, the backward pass overflowed)")
    batch = obj_values.shape[0]
    flat = obj_values.reshape(batch, -1).astype(np.float64)
    if top1:
        target_index = values[top1_output(gg, tensor)].astype(np.int64)
        objective = flat[np.arange(batch), target_index]
    else:
        objective = (flat * cotangent.reshape(batch, -1)).sum(axis=1)
    outs = {t: values[gg.forward_outputs[t]] for t in forward_outputs}
    return GradientResult(grads, objective, target_index, tensor, outs)


def rule_set_names() -> list[str]:
    from ..engine.registry import RULES

    return list(RULES.rule_sets)


def gradient_support(model: LoadedModel) -> tuple[bool, str]:
    """Whether the input gradient of the first output can be built (once per model).

    Forward-only features keep working for a model without it; the reason names
    the op type and node that lack a backward rule. A model whose image size is free is
    checked at its configured size, else at 224 x 224 (its graphs are built per size run).
    """
    from ..errors import VisError

    def check():
        sizes = representative_sizes(model)
        try:
            build_gradient_model(specialized_proto(model, sizes), [model.output_names[0]], [model.image_input])
            return True, ""
        except VisError as exc:
            at = dict(dict(sizes).get(model.image_input, ()))
            where = f" (checked at {' x '.join(str(v) for v in at.values())})" if at else ""
            return False, str(exc) + where

    return model.memo("gradient_support", check)


def representative_sizes(model: LoadedModel) -> tuple:
    """models.inputs.static_sizes for a typical run: the image input's free height and width at the
    configured size (model config `input.size`), else 224; any other free axis at 1."""
    free = model.memo("free_input_axes", lambda: free_input_axes(model.proto))
    found = model.memo("image_input_axes", lambda: image_input(model.proto, model.infos))
    configured = list(model.config.input.size)
    out = []
    for name, axes in free.items():
        spatial = found[1] if found is not None and found[0] == name else ()
        side = dict(zip(spatial, configured if len(configured) == 2 else [limits.REFERENCE_SIDE] * 2))
        out.append((name, tuple((a, side.get(a, 1)) for a in axes)))
    return tuple(out)
