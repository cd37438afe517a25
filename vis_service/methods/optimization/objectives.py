"""Objective terms, the graph "heads" they need, and the per-step gradient run.

Every objective is <T, c> for some tensor T with a fixed cotangent c, so the
cotangents are built once before the loop and each step is ONE run of a cached
forward+backward graph (d sum_T <T, c_T> / d input, plus T's forward values):
- neuron, channel (mean), direction, class logit: T is the layer itself;
- whole-layer L2 (deep dream): T = layer * layer (a Mul head);
- class probability: T = the graph's Softmax output, or a Softmax head on the scores;
- Lucid's diversity: T = the [B, B] cosine similarities of the per-image Gram
  matrices of a layer (Reshape/MatMul/ReduceSum/Sqrt/Div head);
- feature inversion: T = (layer - phi0)^2 with phi0 fed as an extra graph input.
Heads use standard ops the backward engine has rules for; the head model plus the
backward graph is built once per (model, heads, objective tensors) and cached by
the runtime like any gradient session.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ...engine.backward import GradientGraph, build_gradient_model
from ...errors import InvalidArgument
from ...graph.loading import BATCH_DIM, opset_version, tensor_infos
from ...graph.names import resolve_tensor
from ...models.inputs import static_sizes
from ...models.store import LoadedModel
from ...runtime.sessions import Runtime
from ..activations import compute_activations
from ..gradient import positions_phrase, specialized_proto
from ..targets import (class_scores_tensor, probability_node, require_activation, require_batch_first,
                       require_channels_first)

KINDS = ("neuron", "channel", "layer", "class_score", "direction")


@dataclass
class Term:
    """One weighted objective term; `images` = batch entries it applies to (empty = all)."""

    kind: str
    layer: str = ""
    channel: int = 0
    y: int | None = None
    x: int | None = None
    vector: Sequence[float] = ()
    index: int = 0
    probability: bool = False
    weight: float = 1.0
    images: Sequence[int] = ()
    field: str = "objectives[0]"


@dataclass(frozen=True)
class Head:
    """A small subgraph appended to the model: `kind` of `tensor`."""

    kind: str    # "square", "softmax", "sigmoid", "gram_similarity", "squared_difference"
    tensor: str

    @property
    def output(self) -> str:
        return f"__opt_{self.kind}__{self.tensor}"

    @property
    def reference_input(self) -> str:
        return f"__opt_reference__{self.tensor}"


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def with_heads(model: LoadedModel, heads: Sequence[Head], base: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of the model's graph (or of `base`, that graph specialized to an image size) with the
    heads' nodes (and inputs) appended, shapes inferred."""
    m = onnx.ModelProto()
    m.CopyFrom(model.proto if base is None else base)
    infos = model.infos if base is None else tensor_infos(base)
    g = m.graph
    opset = opset_version(m)
    for h in heads:
        t, out, p = h.tensor, h.output, f"__opt_{h.kind}__{h.tensor}/"
        if h.kind == "square":
            g.node.append(helper.make_node("Mul", [t, t], [out], name=p + "mul"))
        elif h.kind == "softmax":
            g.node.append(helper.make_node("Flatten", [t], [p + "flat"], axis=1, name=p + "flatten"))
            g.node.append(helper.make_node("Softmax", [p + "flat"], [out], axis=1, name=p + "softmax"))
        elif h.kind == "sigmoid":
            g.node.append(helper.make_node("Flatten", [t], [p + "flat"], axis=1, name=p + "flatten"))
            g.node.append(helper.make_node("Sigmoid", [p + "flat"], [out], name=p + "sigmoid"))
        elif h.kind == "squared_difference":
            info = infos[t]
            g.input.append(helper.make_tensor_value_info(h.reference_input, info.elem_type, list(info.shape)))
            g.node.append(helper.make_node("Sub", [t, h.reference_input], [p + "diff"], name=p + "sub"))
            g.node.append(helper.make_node("Mul", [p + "diff", p + "diff"], [out], name=p + "mul"))
        elif h.kind == "gram_similarity":
            # F [N, C, HW]; G = F F^T flattened [N, C*C]; Gn = G / sqrt(|G|^2 + 1e-10); S = Gn Gn^T [N, N]
            shape = _const(g, p + "shape", np.array([0, 0, -1], np.int64))
            g.node.append(helper.make_node("Reshape", [t, shape], [p + "f"], name=p + "reshape"))
            g.node.append(helper.make_node("Transpose", [p + "f"], [p + "ft"], perm=[0, 2, 1], name=p + "transpose"))
            g.node.append(helper.make_node("MatMul", [p + "f", p + "ft"], [p + "gram"], name=p + "gram"))
            g.node.append(helper.make_node("Flatten", [p + "gram"], [p + "gf"], axis=1, name=p + "flatten"))
            g.node.append(helper.make_node("Mul", [p + "gf", p + "gf"], [p + "sq"], name=p + "sq"))
            if opset >= 13:
                axes = _const(g, p + "axes", np.array([1], np.int64))
                g.node.append(helper.make_node("ReduceSum", [p + "sq", axes], [p + "ss"], keepdims=1, name=p + "sum"))
            else:
                g.node.append(helper.make_node("ReduceSum", [p + "sq"], [p + "ss"], axes=[1], keepdims=1, name=p + "sum"))
            eps = _const(g, p + "eps", np.array(1e-10, np.float32))
            g.node.append(helper.make_node("Add", [p + "ss", eps], [p + "sse"], name=p + "add"))
            g.node.append(helper.make_node("Sqrt", [p + "sse"], [p + "norm"], name=p + "sqrt"))
            g.node.append(helper.make_node("Div", [p + "gf", p + "norm"], [p + "gn"], name=p + "div"))
            g.node.append(helper.make_node("Transpose", [p + "gn"], [p + "gnt"], perm=[1, 0], name=p + "transpose2"))
            g.node.append(helper.make_node("MatMul", [p + "gn", p + "gnt"], [out], name=p + "similarity"))
        else:  # pragma: no cover - internal
            raise ValueError(h.kind)
    try:
        return shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument("objectives", f"cannot attach the objective heads: {exc}") from None


def require_image_input_only(model: LoadedModel, field: str, method: str) -> None:
    """INVALID_ARGUMENT naming `field` ("{input}" in it: the first other input's name) where the model
    has inputs besides the image input: the optimization loops feed the image input alone."""
    others = [n for n in model.input_names if n != model.image_input]
    if others:
        raise InvalidArgument(field.format(input=others[0]),
                              f"model input {others[0]!r} would get no value: {method} optimizes and feeds the image "
                              f"input {model.image_input!r} alone, so it takes models with that one input only (this "
                              f"one also has {others})")


def require_float_image(model: LoadedModel, field: str, method: str) -> None:
    """INVALID_ARGUMENT naming `field` unless the image input is a 4-D float tensor (float16 is cast to at
    the feed): the loops move an image by gradient steps."""
    info = model.infos[model.image_input]
    if info.dtype.kind != "f":
        raise InvalidArgument(field, f"input {model.image_input!r} is {info.dtype}; {method} moves the image by gradient "
                                     "steps, so it needs a float image input")
    if info.shape is not None and len(info.shape) != 4:
        # a 1-D (audio) or 3-D (video) CNN: the loops make images; they were told to give an image size,
        # and given one, that the model takes another rank
        raise InvalidArgument(field, f"{method} needs a 4-D image input [N, C, H, W] (or NHWC), got "
                                     f"{model.image_input!r} of shape {list(info.shape)}")


def objective_session(runtime: Runtime, model: LoadedModel, heads: Sequence[Head], objectives: Sequence[str],
                      sizes: tuple = (), rule_set: str = "gradient"):
    """Cached session: model + heads, forward + d sum <objective, cotangent> / d image input.
    `sizes`: the image size of the loop where the model's is free (models.inputs.static_sizes)."""
    heads = tuple(sorted(set(heads), key=lambda h: (h.kind, h.tensor)))
    objectives = tuple(dict.fromkeys(objectives))
    key = ("optimization", heads, objectives, model.image_input) + ((sizes,) if sizes else ())
    if rule_set != "gradient":
        key += (rule_set,)

    def build():
        proto = with_heads(model, heads, specialized_proto(model, sizes)) if heads else specialized_proto(model, sizes)
        gg = build_gradient_model(proto, list(objectives), [model.image_input], rule_set=rule_set)
        return gg.model, gg

    return runtime.session(model.graph_id, key, build)


class _BoundGraph:
    """A cached objective session with its cotangents as feeds of its own input names and types."""

    def __init__(self, session, model: LoadedModel, cotangents: dict[str, np.ndarray]):
        self.session = session
        gg: GradientGraph = session.meta
        self.gg = gg
        # the graph's inputs take their own float type (a float16 model's image and cotangents); the
        # loops compute in float32 / float64 and cast at the feed
        self.dtypes = {i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                       for i in gg.model.graph.input if i.type.HasField("tensor_type")}
        self.cotangents = {name: np.ascontiguousarray(c, self.dtypes.get(name, np.float32))
                           for name, c in ((gg.cotangent_inputs[t], c) for t, c in cotangents.items())}
        self.image_input = model.image_input
        self.grad_name = gg.gradient_outputs[model.image_input]
        self.forward_names = {t: gg.forward_outputs[t] for t in cotangents}

    def run(self, x: np.ndarray, extra_feeds: dict[str, np.ndarray] | None = None):
        feeds = {self.image_input: x, **self.cotangents, **(extra_feeds or {})}
        feeds = {k: v.astype(self.dtypes.get(k, v.dtype), copy=False) for k, v in feeds.items()
                 if k in self.session.input_names}
        names = [self.grad_name] + list(self.forward_names.values())
        values = self.session.run_dict(list(dict.fromkeys(names)), feeds)
        return values[self.grad_name], {t: values[n] for t, n in self.forward_names.items()}


class GradientRun:
    """One cached graph with fixed cotangents: `run(x)` -> (d objective / dx, forward values).

    `redirect_stuck`: during the first REDIRECT_STEPS runs (the loop's steps), an image whose
    gradient is zero everywhere (the objective's units all inactive: nothing would ever move it)
    takes its gradient from the same graph under Lucid's `redirected` ReLU rules instead
    (engine/rules/activations.py), as Lucid's render_vis does (lucid/misc/redirected_relu_grad.py:
    at most 16 steps; after them a unit pinned at ReLU6's top, the objective's maximum, kept taking
    the redirected gradient: 222 of 256 steps, each twice the work). That session is built on the
    first step that needs it, then cached like the other."""

    REDIRECT_STEPS = 16

    def __init__(self, runtime: Runtime, model: LoadedModel, heads: Sequence[Head],
                 cotangents: dict[str, np.ndarray], x_example: np.ndarray, redirect_stuck: bool = False):
        self.model = model
        self._runtime, self._heads, self._cotangents = runtime, list(heads), cotangents
        self._sizes = static_sizes(model, {model.image_input: x_example.shape})
        self.exact = _BoundGraph(objective_session(runtime, model, heads, list(cotangents), self._sizes),
                                 model, cotangents)
        self.session, self.gg = self.exact.session, self.exact.gg
        self.redirect_stuck = redirect_stuck
        self._redirected: _BoundGraph | None = None
        self._runs = 0
        self.redirected_steps = 0   # runs where some image took the redirected gradient

    def run(self, x: np.ndarray, extra_feeds: dict[str, np.ndarray] | None = None):
        grad, forward = self.exact.run(x, extra_feeds)
        self._runs += 1
        if self.redirect_stuck and self._runs <= self.REDIRECT_STEPS:
            stuck = ~np.any(grad.reshape(len(grad), -1) != 0, axis=1)
            if stuck.any():
                if self._redirected is None:
                    self._redirected = _BoundGraph(
                        objective_session(self._runtime, self.model, self._heads, list(self._cotangents),
                                          self._sizes, rule_set="redirected"), self.model, self._cotangents)
                redirected, _ = self._redirected.run(x, extra_feeds)
                grad = np.where(stuck.reshape((-1,) + (1,) * (grad.ndim - 1)), redirected, grad)
                self.redirected_steps += 1
        return grad, forward


def tensor_shape(runtime: Runtime, model: LoadedModel, tensor: str, x_example: np.ndarray) -> tuple[int, ...]:
    """Concrete shape of `tensor` for the batch of `x_example` (one forward run if not static)."""
    batch = x_example.shape[0]
    info = model.infos.get(tensor)
    shape = info.shape if info is not None else None
    if shape is not None and all(isinstance(d, int) or d == BATCH_DIM for d in shape):
        return tuple(batch if d == BATCH_DIM else int(d) for d in shape)
    feeds = {model.image_input: x_example.astype(model.infos[model.image_input].dtype, copy=False)}
    return tuple(compute_activations(runtime, model, feeds, [tensor])[tensor].shape)


@dataclass
class CompiledObjective:
    """The terms of a Maximize request as cotangents on (head) tensors."""

    run: GradientRun
    term_tensors: list[str]                  # per term: the tensor its value is read from
    term_cotangents: list[np.ndarray]        # per term: unweighted, masked cotangent [B, ...]
    term_masks: np.ndarray                   # [B, T] bool: term applies to image
    weights: np.ndarray                      # [T]
    layers: list[str]                        # resolved layer per term
    diversity_tensor: str | None = None
    diversity_weight: float = 0.0

    def evaluate(self, x: np.ndarray):
        """(gradient of the maximized objective w.r.t. x, term values [B, T] (NaN where a term does
        not apply), diversity value (a scalar, Lucid's definition))."""
        grad, fwd = self.run.run(x)
        b = x.shape[0]
        vals = np.full((b, len(self.term_tensors)), np.nan)
        for i, (t, c) in enumerate(zip(self.term_tensors, self.term_cotangents)):
            v = (fwd[t].reshape(b, -1).astype(np.float64) * c.reshape(b, -1)).sum(axis=1)
            vals[:, i] = np.where(self.term_masks[:, i], v, np.nan)
        div = 0.0
        if self.diversity_tensor is not None:
            s = fwd[self.diversity_tensor].astype(np.float64)
            div = float((s * (1.0 - np.eye(b))).sum() / b)
        return grad, vals, div


def _spatial_count(shape) -> int:
    return int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1


def compile_objective(runtime: Runtime, model: LoadedModel, terms: Sequence[Term], batch: int,
                      x_example: np.ndarray, diversity: float = 0.0, diversity_layer: str = "") -> CompiledObjective:
    heads: list[Head] = []
    cots: dict[str, np.ndarray] = {}
    term_tensors, term_cots, layers = [], [], []
    masks = np.zeros((batch, len(terms)), bool)
    weights = np.array([t.weight for t in terms], np.float64)

    def shape_of(tensor):
        return tensor_shape(runtime, model, tensor, x_example)

    for i, term in enumerate(terms):
        f = term.field
        images = list(term.images)
        for j, b in enumerate(images):
            if not 0 <= b < batch:
                raise InvalidArgument(f"{f}.images[{j}]", f"image {b} outside the batch [0, {batch})")
        mask = np.zeros(batch, bool)
        mask[images if images else slice(None)] = True
        masks[:, i] = mask
        if term.kind == "class_score":
            # a node's name (e.g. the Softmax's) stands for its output, in both branches
            output = resolve_tensor(model.proto, term.layer, kind="output") if term.layer else None
            if term.probability:
                made_by = probability_node(model, output)
                if made_by is not None and made_by.op_type != "LogSoftmax":  # the model's own probabilities
                    tensor = output or model.output_names[0]
                    layer = tensor
                else:
                    scores = class_scores_tensor(model, output)
                    per = int(np.prod(shape_of(scores)[1:]))
                    # a single score per sample is a binary logit (a softmax over it was a constant 1)
                    heads.append(Head("sigmoid" if per == 1 and made_by is None else "softmax", scores))
                    tensor, layer = heads[-1].output, scores
                    shape = (batch, per)
            else:
                tensor = class_scores_tensor(model, output)
                layer = tensor
            require_batch_first(model, layer, f"{f}.class_score.layer", term.layer)
            if not tensor.startswith("__opt_"):
                shape = shape_of(tensor)
            per = int(np.prod(shape[1:], dtype=np.int64))
            if not 0 <= term.index < per:
                raise InvalidArgument(f"{f}.class_score.index", f"must be in [0, {per}) for scores {layer!r} of shape {list(shape)}")
            base = np.zeros((per,), np.float64)
            base[term.index] = 1.0
            base = base.reshape(shape[1:])
        else:
            if not term.layer:
                raise InvalidArgument(f"{f}.{term.kind}.layer", "required")
            layer = resolve_tensor(model.proto, term.layer, kind="layer")
            require_activation(model, layer, f"{f}.{term.kind}.layer", term.layer, differentiable=True)
            shape = shape_of(layer)
            tensor = layer
            if term.kind == "layer":
                heads.append(Head("square", layer))
                tensor = heads[-1].output
                base = np.full(shape[1:], 1.0 / max(1, int(np.prod(shape[1:], dtype=np.int64))))
            else:
                if len(shape) < 2:
                    raise InvalidArgument(f"{f}.{term.kind}.layer", f"tensor {layer!r} of shape {list(shape)} has no channel axis")
                require_channels_first(model, layer, f"{f}.{term.kind}.layer", term.layer)
                channels = shape[1]
                base = np.zeros(shape[1:], np.float64)
                if term.kind == "direction":
                    v = np.asarray(term.vector, np.float64)
                    if v.shape != (channels,):
                        raise InvalidArgument(f"{f}.direction.vector", f"needs {channels} values (channels of {layer!r}), got {v.size}")
                    if not np.isfinite(v).all():
                        raise InvalidArgument(f"{f}.direction.vector", "contains NaN or Inf")
                    base += (v / _spatial_count(shape)).reshape((channels,) + (1,) * (len(shape) - 2))
                else:
                    if not 0 <= term.channel < channels:
                        raise InvalidArgument(f"{f}.{term.kind}.channel", f"must be in [0, {channels}) for {layer!r} of shape {list(shape)}")
                    if term.kind == "channel":
                        base[term.channel] = 1.0 / _spatial_count(shape)
                    else:  # neuron
                        spatial = shape[2:]
                        pos = []
                        for name, given, size in zip(("y", "x"), (term.y, term.x), spatial):
                            p = size // 2 if given is None else int(given)
                            if not 0 <= p < size:
                                raise InvalidArgument(f"{f}.neuron.{name}", f"must be in [0, {size}) for {layer!r} of shape {list(shape)}")
                            pos.append(p)
                        for name, given in list(zip(("y", "x"), (term.y, term.x)))[len(spatial):]:
                            # a 2-D [N, C] layer has one unit per channel: a position there would be ignored
                            if given not in (None, 0):
                                raise InvalidArgument(f"{f}.neuron.{name}",
                                                      f"must be unset or 0: {layer!r} of shape {list(shape)} "
                                                      f"{positions_phrase(len(spatial))}, got {given}")
                        base[(term.channel,) + tuple(pos) + (0,) * (len(spatial) - len(pos))] = 1.0
        cot = np.where(mask.reshape((batch,) + (1,) * base.ndim), base[None], 0.0)
        term_tensors.append(tensor)
        term_cots.append(cot)
        layers.append(layer)
        cots[tensor] = cots.get(tensor, 0.0) + term.weight * cot
    div_tensor = None
    if diversity > 0:
        dl = resolve_tensor(model.proto, diversity_layer, kind="layer") if diversity_layer else layers[0]
        if diversity_layer:  # a weight has a 4-D shape too, and no rows of the batch to compare
            require_activation(model, dl, "diversity_layer", diversity_layer, differentiable=True)
        dshape = shape_of(dl)
        if len(dshape) != 4:
            raise InvalidArgument("diversity_layer", f"needs a 4-D feature map; {dl!r} has shape {list(dshape)}")
        # its Gram matrices read [N, C, H*W]: a channels-last map would compare rows
        require_channels_first(model, dl, "diversity_layer", diversity_layer or dl)
        if batch < 2:
            raise InvalidArgument("diversity", "needs batch >= 2")
        heads.append(Head("gram_similarity", dl))
        div_tensor = heads[-1].output
        # maximize objective - diversity * sum_{i != j} S_ij / B
        cots[div_tensor] = -diversity * (1.0 - np.eye(batch)) / batch
    run = GradientRun(runtime, model, heads, cots, x_example, redirect_stuck=True)
    return CompiledObjective(run, term_tensors, term_cots, masks, weights, layers, div_tensor, diversity)
