"""Class activation maps: which regions of a feature map a class score depends on.

Like pytorch-grad-cam's BaseCAM, every variant shares the same steps and only
says how the channel weights (or the per-position combination) are made:

1. the layer: a named tensor, or by default the last 4-D feature map before the
   global pooling / flatten, found by walking back from the class scores
   (`default_layer`); an activation the target is computed from (`require_before`);
2. the target: a class index per image (default: top-1 of the pre-softmax class
   scores, see `targets.py`); gradient variants accept any `Objective`;
3. the variant's weights and map ``cam = ReLU(sum_c w_c A_c)`` at the layer's
   resolution;
4. the heat map: ``cam`` upsampled bilinearly (half-pixel centres) to the input
   size and min-max scaled to [0, 1] per image.

Variants (`VARIANTS`):

- ``gradcam`` (Selvaraju et al. 2017): w_c = mean over positions of dy/dA_c.
  One onnxruntime run of the cached forward+backward graph returns A and dy/dA.
- ``gradcam++`` (Chattopadhay et al. 2018), in pytorch-grad-cam's closed form
  from first-order gradients: alpha = g^2 / (2 g^2 + sum(A) g^3), w_c =
  sum(alpha * ReLU(g)); as in the paper, without pytorch-grad-cam's + 1e-6 in the
  denominator, which is not small next to g^2 where gradients are ~1e-3 (ResNet-20:
  weights ~1% apart); alpha = 0 where g = 0.
- ``layercam`` (Jiang et al. 2021): cam = ReLU(sum_c ReLU(g_c) * A_c), weights
  reported as the spatial mean of ReLU(g).
- ``guided_gradcam``: guided backprop of the same objective w.r.t. the input
  (rule set "guided") times the Grad-CAM heat map ("attribution").
- ``cam`` (Zhou et al. 2016) for heads "global average pooling -> one linear
  layer (Gemm / MatMul(+Add) / 1x1 Conv) -> class scores" or global average
  pooling straight into the scores (SqueezeNet): w = the linear layer's weight
  row of the class, read from the graph. Anything else is INVALID_ARGUMENT
  saying which node breaks the pattern.
- ``scorecam`` (Wang et al. 2020), as in the paper and its reference code: each
  channel's activation is upsampled to the input size, min-max normalized to
  [0, 1] and multiplied into the (preprocessed) input; the weight is the target
  class's softmax probability on that masked input. Masking the *input* means a
  full forward pass per masked image (nothing can be replayed from the layer):
  the masked images are batched (``batch`` per run), progress is streamed per
  batch and the loop stops on cancel.
- ``ablationcam`` (Desai & Ramaswamy 2020): the variant that perturbs the
  layer's *activation*, so it replays only the graph after the layer
  (`graph.subgraph.graph_after`): channel k of A is zeroed and w_k =
  (y - y_k) / y with y the class score. Where the layer does not separate the
  input from the output (inside a residual block), the cut graph also takes the
  original inputs, fed unchanged, so the replay is still exact.

All channel weights are returned as "weights" [N, C].
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..errors import InvalidArgument
from ..graph.constants import constant_value
from ..graph.names import resolve_tensor
from ..graph.paths import dependents
from ..graph.subgraph import graph_after
from ..models.config import ImageSpec, resolve_image_spec
from ..models.inputs import image_dims_at
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from . import batching
from .activations import exposed_session
from .gradient import Objective, make_cotangent, objective_tensor_name, require_finite, run_gradient
from .progress import NO_PROGRESS, MethodResult, Progress
from .targets import (batch_axis_lost, channels_last, class_probabilities, require_activation, require_batch_first,
                      require_channels_first, require_from_image, require_rows, traced_axes)

DEFAULT_BATCH = 32
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
# (a QuantizeLinear -> DequantizeLinear pair of a QDQ model rounds the pooled value to its grid: the
# head stays the linear layer it emulates)
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "QuantizeLinear", "DequantizeLinear"}
_REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
               "ReduceMin", "ReduceProd", "ReduceSumSquare"}


# ----------------------------------------------------------------------------
# Graph facts: the default layer and the head after it


def _producers(g: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in g.node for o in n.output if o}


def _consumers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _is_feature_map(model: LoadedModel, name: str) -> bool:
    info = model.infos.get(name)
    return bool(info and info.elem_type in FLOAT_TYPES and info.shape is not None and len(info.shape) == 4
                and not channels_last(model, name) and not batch_axis_lost(model, name))


def _reduce_axes(model: LoadedModel, node: onnx.NodeProto) -> list[int] | None:
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = constant_value(model.proto, node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return None if axes is None else [int(a) % 4 for a in axes]


def pooling_kind(model: LoadedModel, node: onnx.NodeProto, x: str) -> str | None:
    """How `node` removes the spatial dims of the 4-D tensor `x`: "average", "max",
    "other" (a reduction that is neither), "flatten" (kept, but flattened), or None."""
    op = node.op_type
    if op == "GlobalAveragePool":
        return "average"
    if op == "GlobalMaxPool":
        return "max"
    if op == "GlobalLpPool":
        return "other"
    if op in _REDUCE_OPS and node.input[0] == x:
        axes = _reduce_axes(model, node)
        if axes is None and not _attr(node, "noop_with_empty_axes", 0) or axes is not None and {2, 3} <= set(axes):
            return {"ReduceMean": "average", "ReduceMax": "max"}.get(op, "other")
        return None
    if op in ("AveragePool", "MaxPool") and node.input[0] == x:
        out = model.infos.get(node.output[0])
        if out is not None and out.shape is not None and len(out.shape) == 4 and tuple(out.shape[2:]) == (1, 1):
            return "average" if op == "AveragePool" else "max"
        return None
    if op == "Flatten" and node.input[0] == x:
        return "flatten"
    if op == "Reshape" and node.input[0] == x:
        out = model.infos.get(node.output[0])
        if out is not None and out.shape is not None and len(out.shape) == 2:
            return "flatten"
    return None


def _channels_first_source(model: LoadedModel, node: onnx.NodeProto | None) -> str | None:
    """The input of `node` if it is a Transpose NCHW -> NHWC of a 4-D float tensor, else None."""
    if node is None or node.op_type != "Transpose" or list(_attr(node, "perm", [])) != [0, 2, 3, 1]:
        return None
    return node.input[0] if _is_feature_map(model, node.input[0]) else None


@dataclass(frozen=True)
class FeatureHead:
    """The last feature map before the class scores and the node that pools or flattens it."""

    layer: str
    pool: onnx.NodeProto | None
    pool_kind: str | None


def default_layer(model: LoadedModel, scores: str) -> FeatureHead:
    """Walk back from `scores` to the first 4-D float tensor whose consumer reduces space.

    Falls back to the nearest 4-D float tensor with more than one position when no
    such reduction exists (e.g. a fully convolutional head).
    """
    def find() -> FeatureHead:
        g = model.proto.graph
        producers = _producers(g)
        inits = {t.name for t in g.initializer}
        # feature maps are computed from the inputs; weights made in the graph (ConstantOfShape,
        # a Reshape of a stored weight) may be 4-D too, e.g. light_inception_v1's classifier
        dependent = dependents(g, [i.name for i in g.input if i.name not in inits])
        queue, seen, fallback, untraced, traced_map = deque([scores]), {scores}, None, None, None
        axes_of = traced_axes(model)

        def traced(x: str) -> bool:
            return tuple(axes_of.get(x) or ()) == (2, 3)

        while queue:
            name = queue.popleft()
            node = producers.get(name)
            if node is None:
                continue
            for x in node.input:
                if not x or x in seen or x not in dependent:
                    continue
                seen.add(x)
                source = _channels_first_source(model, producers.get(x))
                if source is not None:
                    # an NHWC view of a feature map (tf2onnx's Transpose before a Keras Flatten's
                    # Reshape): its axis 1 is a row, not a channel; the map is the Transpose's input
                    kind = pooling_kind(model, node, x)
                    if kind is not None:
                        return FeatureHead(source, node, kind)
                elif _is_feature_map(model, x) and tuple(model.infos[x].shape[2:]) != (1, 1):  # [N, C, 1, 1] is pooled
                    kind = pooling_kind(model, node, x)
                    if kind is not None and traced(x):
                        return FeatureHead(x, node, kind)
                    if kind is not None and untraced is None:
                        # rows and columns not traced to axes 2 and 3 (after tf2onnx's reshapes around a
                        # Keras LayerNormalization, an NHWC map reads as [N, H, W, C]): a traced map
                        # further back is the better default
                        untraced = FeatureHead(x, node, kind)
                    if traced(x) and traced_map is None:
                        traced_map = x
                    if fallback is None:
                        fallback = x
                queue.append(x)
        if traced_map is not None and (untraced is not None or traced_map != fallback):
            return FeatureHead(traced_map, None, None)
        if untraced is not None:
            return untraced
        if fallback is not None:
            return FeatureHead(fallback, None, None)
        raise InvalidArgument("layer", f"no 4-D feature map [N, C, H, W] found before the class scores {scores!r}; "
                                       "name one in `layer`")

    return model.memo(("cam_default_layer", scores), find)


def resolve_cam_layer(model: LoadedModel, layer: str, scores: str, field: str = "layer") -> str:
    """The tensor of a named layer (NOT_FOUND with suggestions) or the default; must be 4-D. A default
    that is the image input itself (no float map between it and the scores: an operator-form quantized
    model keeps its maps as integers) is refused: a map of the input explains nothing."""
    inputs = {i.name for i in model.proto.graph.input}
    if not layer:
        default = default_layer(model, scores).layer
        if default in inputs:
            raise InvalidArgument(field, f"no 4-D float feature map [N, C, H, W], the images' batch first, between "
                                         f"the input and {scores!r} (a quantized model in operator form keeps its maps "
                                         "as integers; a detection model's backbone takes its images one by one, "
                                         "[1, C, H, W]); name one in `layer`")
        return default
    tensor = resolve_tensor(model.proto, layer, kind="layer")
    require_activation(model, tensor, field, layer)
    require_from_image(model, tensor, field, layer)
    require_channels_first(model, tensor, field, layer)
    info = model.infos.get(tensor)
    if info is None or info.shape is None or len(info.shape) != 4 or info.elem_type not in FLOAT_TYPES:
        shape = "unknown" if info is None or info.shape is None else list(info.shape)
        default = default_layer(model, scores).layer
        hint = f"; try the default {default!r}" if default not in inputs else ""
        raise InvalidArgument(field, f"{layer!r} (tensor {tensor!r}, shape {shape}) is not a 4-D float feature map "
                                     f"[N, C, H, W]{hint}")
    return tensor


def require_positions(model: LoadedModel, layer: str, tensor: str, field: str = "layer") -> None:
    """INVALID_ARGUMENT naming `field` for a map of one position (a squeeze-excitation vector, a pooled
    map [N, C, 1, 1]): every CAM method's map of it was blank."""
    shape = model.infos[tensor].shape
    if tuple(shape[2:]) == (1, 1):
        raise InvalidArgument(field, f"{layer!r} (tensor {tensor!r}, shape {list(shape)}) has one position: "
                                     "its map is a single value; name a feature map with rows and columns")


def require_before(model: LoadedModel, layer: str, tensor: str, target: str, scores: str,
                   field: str = "layer") -> None:
    """INVALID_ARGUMENT naming `field` unless the target's tensor is computed from the layer's
    `tensor`: a map of a layer the target does not depend on (after the target, e.g. a Softmax
    output, or on a side branch) explains nothing; the gradient engine would blame `wrt`."""
    def reaches(t: str) -> bool:
        return target in model.memo(("cam_computed_from", t), lambda: dependents(model.proto.graph, [t]))

    if reaches(tensor):
        return
    try:
        default = default_layer(model, scores).layer
        hint = f", e.g. the default {default!r}" if default != tensor and reaches(default) else ""
    except InvalidArgument:
        hint = ""
    named = repr(layer or tensor) + (f" (tensor {tensor!r})" if layer and layer != tensor else "")
    raise InvalidArgument(field, f"{named} does not lie before the target's tensor "
                                 f"{target!r} (it is computed after it or on another branch), so the target does not "
                                 f"depend on it; name a feature map the target is computed from{hint}")


def _linear_head_weights(model: LoadedModel, scores: str) -> np.ndarray:
    """[K, C] weights of the linear map from the globally averaged feature map to `scores`."""
    head = default_layer(model, scores)
    why = "CAM needs a global-average-pooling + linear head: "
    if head.pool is None:
        raise InvalidArgument("method", why + f"no global pooling or flatten before the class scores {scores!r}")
    if head.pool_kind == "flatten":
        raise InvalidArgument("method", why + f"node {head.pool.name or head.pool.op_type!r} ({head.pool.op_type}) "
                                             "flattens the feature map without pooling it, so the class scores weight "
                                             "each position separately")
    if head.pool_kind != "average":
        raise InvalidArgument("method", why + f"node {head.pool.name or head.pool.op_type!r} pools with "
                                             f"{head.pool.op_type}, not an average")
    g = model.proto.graph
    consumers = _consumers(g)
    # tensors the scores depend on, so that side branches (Shape -> Reshape) are ignored
    producers = _producers(g)
    ancestors, stack = set(), [scores]
    while stack:
        t = stack.pop()
        if t in ancestors:
            continue
        ancestors.add(t)
        if t in producers:
            stack.extend(i for i in producers[t].input if i)
    weight = None
    t = head.pool.output[0]
    channels = model.infos[head.layer].shape[1]
    while t != scores:
        nxt = [n for n in consumers.get(t, []) if any(o in ancestors for o in n.output)]
        if len(nxt) != 1:
            readers = ", ".join(f"{n.name or n.op_type!r} ({n.op_type})" for n in nxt)
            raise InvalidArgument("method", why + f"after the pooling, {t!r} is read by {len(nxt)} nodes on the way "
                                                 f"to the scores ({readers}): the head branches or is non-linear "
                                                 "(e.g. x * sigmoid(x)); Grad-CAM works on any head")
        node = nxt[0]
        name = node.name or node.op_type
        others = [i for i in node.input if i and i != t]
        consts = {i: constant_value(model.proto, i) for i in others}
        if node.op_type in _PASS_THROUGH:
            pass
        elif weight is None and node.op_type == "Gemm" and node.input[0] == t and not _attr(node, "transA", 0) \
                and consts.get(node.input[1]) is not None:
            b = consts[node.input[1]]
            weight = (b if _attr(node, "transB", 0) else b.T) * float(_attr(node, "alpha", 1.0))
        elif weight is None and node.op_type == "MatMul" and node.input[0] == t and consts.get(node.input[1]) is not None \
                and consts[node.input[1]].ndim == 2:
            weight = consts[node.input[1]].T
        elif weight is None and node.op_type == "Conv" and node.input[0] == t and consts.get(node.input[1]) is not None \
                and consts[node.input[1]].shape[2:] == (1, 1) and int(_attr(node, "group", 1)) == 1:
            weight = consts[node.input[1]][:, :, 0, 0]
        elif node.op_type == "Add" and weight is not None and all(v is not None for v in consts.values()):
            pass  # the linear layer's bias: shifts the score, not the map
        else:
            raise InvalidArgument("method", why + f"node {name!r} ({node.op_type}) between the pooling and the class "
                                                 "scores is not (one) linear layer")
        t = node.output[0]
    if weight is None:  # pooled maps are the scores themselves (SqueezeNet): identity weights
        weight = np.eye(channels, dtype=np.float32)
    weight = np.asarray(weight, dtype=np.float32)
    if weight.shape[1] != channels:
        raise InvalidArgument("method", why + f"head weights {list(weight.shape)} do not match {channels} channels")
    return weight


# ----------------------------------------------------------------------------
# Input geometry and resampling


def input_spec(model: LoadedModel, preprocess=None, shape: tuple | None = None) -> ImageSpec | None:
    """The resolved preprocessing of the image input, or None where it cannot be resolved.

    `shape`: the image tensor's, which gives the size of a model whose image size is free (its
    config's mean and std apply whatever the size; without a size the spec did not resolve)."""
    try:
        return resolve_image_spec(model.config, preprocess, model.image_input, image_dims_at(model, shape))
    except InvalidArgument:
        return None


def image_layout(model: LoadedModel, x: np.ndarray, preprocess=None) -> str:
    spec = input_spec(model, preprocess, x.shape)
    if spec is not None:
        return spec.layout
    return "NHWC" if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3) else "NCHW"


def spatial_size(x: np.ndarray, layout: str) -> tuple[int, int]:
    if x.ndim != 4:
        raise InvalidArgument("input", f"the image input must be 4-D, got shape {list(x.shape)}")
    return (x.shape[1], x.shape[2]) if layout == "NHWC" else (x.shape[2], x.shape[3])


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation (half-pixel centres, clamped at the edges)."""
    src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1.0 - w
    m[np.arange(n_out), i1] += w
    return m


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [..., h, w] maps to [..., H, W] (like torch interpolate, align_corners=False)."""
    mh = _bilinear_matrix(maps.shape[-2], size[0])
    mw = _bilinear_matrix(maps.shape[-1], size[1])
    # two matrix products (not one three-operand einsum, which loops over all H*W*h*w terms)
    return mh @ maps.astype(np.float64) @ mw.T


def minmax(maps: np.ndarray) -> np.ndarray:
    """Scale each [H, W] map of [N, H, W] to [0, 1] (constant maps -> 0)."""
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0)


def _channel_broadcast(maps: np.ndarray, layout: str) -> np.ndarray:
    """[N, H, W] -> broadcastable against an image batch in `layout`."""
    return maps[..., None] if layout == "NHWC" else maps[:, None]


# ----------------------------------------------------------------------------
# Shared steps


@dataclass
class CamContext:
    runtime: Runtime
    model: LoadedModel
    feeds: dict[str, np.ndarray]
    layer: str                    # tensor name of the feature map
    objective: Objective
    layout: str
    batch: int = DEFAULT_BATCH
    progress: Progress = NO_PROGRESS

    @property
    def x(self) -> np.ndarray:
        return self.feeds[self.model.image_input]

    @property
    def n(self) -> int:
        return self.x.shape[0]


@dataclass
class CamParts:
    cam: np.ndarray                 # [N, h, w] before ReLU
    weights: np.ndarray             # [N, C]
    target_index: np.ndarray | None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    objective_is_class: bool = True


def _class_target(ctx: CamContext) -> str:
    """Score tensor of an output target (forward variants need a class index)."""
    if ctx.objective.kind != "output":
        raise InvalidArgument("target", f"this method needs a class (output) target, got a {ctx.objective.kind} target")
    tensor = objective_tensor_name(ctx.model, ctx.objective)
    require_batch_first(ctx.model, tensor, "target", ctx.objective.layer)
    return tensor


def class_indices(ctx: CamContext, scores: np.ndarray, tensor: str) -> np.ndarray:
    require_rows(tensor, scores, ctx.n)
    flat = scores.reshape(ctx.n, -1)
    idx = list(ctx.objective.index)
    if not idx:
        return flat.argmax(axis=1).astype(np.int64)
    if len(idx) not in (1, ctx.n):
        raise InvalidArgument("target.output.index", f"give one value or one per sample ({ctx.n}), got {len(idx)}")
    out = np.broadcast_to(np.asarray(idx, dtype=np.int64), (ctx.n,)).copy()
    if (out < 0).any() or (out >= flat.shape[1]).any():
        raise InvalidArgument("target.output.index", f"must be in [0, {flat.shape[1]})")
    return out


def forward_tensors(ctx: CamContext, feeds: dict[str, np.ndarray], tensors: list[str]) -> dict[str, np.ndarray]:
    session = exposed_session(ctx.runtime, ctx.model, tensors)
    from ..graph.expose import exposed_name

    wanted = [exposed_name(ctx.model.proto, t) for t in dict.fromkeys(tensors)]
    values = session.run_dict(wanted, {k: v for k, v in feeds.items() if k in session.input_names})
    out = {t: values[exposed_name(ctx.model.proto, t)] for t in tensors}
    for t, v in out.items():
        require_finite(f"tensor {t!r}", v)
    return out


def _repeat_feeds(ctx: CamContext, rows: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a perturbed batch: `image` for the image input, rows of the other batched inputs
    (padded to a fixed batch: the caller drops the padding's results, see batching)."""
    return batching.row_feeds(ctx.model, ctx.feeds, rows, image)


# ----------------------------------------------------------------------------
# Variants


class CamVariant:
    """One CAM method: turns the context into a map and channel weights."""

    name = ""

    def compute(self, ctx: CamContext) -> CamParts:  # pragma: no cover - abstract
        raise NotImplementedError


class GradientCam(CamVariant):
    """Variants over A and dy/dA: one run of the forward+backward graph gives both."""

    def gradients(self, ctx: CamContext):
        tensor = objective_tensor_name(ctx.model, ctx.objective)
        if ctx.objective.kind == "output" and not ctx.objective.index:
            cot, target_index = None, None  # top-1: found inside the same run
        else:
            cot, target_index = make_cotangent(ctx.runtime, ctx.model, ctx.feeds, ctx.objective, tensor)
        try:
            res = run_gradient(ctx.runtime, ctx.model, ctx.feeds, tensor, cot, {ctx.layer: ctx.layer},
                               forward_outputs=[ctx.layer], target_index=target_index)
        except InvalidArgument as exc:
            if exc.field != "wrt":
                raise
            # the layer reaches the target only through non-float tensors (e.g. its Shape): CamRequest
            # has no `wrt`, the layer is what the request named
            raise InvalidArgument("layer", f"the target's tensor {tensor!r} does not depend on the values of "
                                           f"{ctx.layer!r} ({exc})") from None
        a = res.outputs[ctx.layer].astype(np.float64)
        g = res.gradients[ctx.layer].astype(np.float64)
        return a, g, res, (tensor, cot)

    def combine(self, a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def compute(self, ctx: CamContext) -> CamParts:
        a, g, res, _ = self.gradients(ctx)
        cam, weights = self.combine(a, g)
        return CamParts(cam, weights, res.target_index, objective_is_class=ctx.objective.kind == "output")


class GradCam(GradientCam):
    name = "gradcam"

    def combine(self, a, g):
        w = g.mean(axis=(2, 3))
        return np.einsum("nc,nchw->nhw", w, a), w


class GradCamPlusPlus(GradientCam):
    name = "gradcam++"

    def combine(self, a, g):
        g2, g3 = g ** 2, g ** 3
        sum_a = a.sum(axis=(2, 3), keepdims=True)
        denom = 2 * g2 + sum_a * g3
        alpha = np.where(g != 0, g2 / np.where(denom != 0, denom, 1e-7), 0.0)
        w = (alpha * np.maximum(g, 0)).sum(axis=(2, 3))
        return np.einsum("nc,nchw->nhw", w, a), w


class LayerCam(GradientCam):
    name = "layercam"

    def combine(self, a, g):
        pos = np.maximum(g, 0)
        return (pos * a).sum(axis=1), pos.mean(axis=(2, 3))


class GuidedGradCam(GradCam):
    name = "guided_gradcam"

    def compute(self, ctx: CamContext) -> CamParts:
        a, g, res, (tensor, cot) = self.gradients(ctx)
        cam, weights = self.combine(a, g)
        if cot is None:  # top-1 was found in the first run: the guided pass uses the same classes
            top1 = Objective("output", ctx.objective.layer, [int(k) for k in res.target_index])
            cot, _ = make_cotangent(ctx.runtime, ctx.model, ctx.feeds, top1, tensor)
        guided = run_gradient(ctx.runtime, ctx.model, ctx.feeds, tensor, cot, {"input": ctx.model.image_input},
                              rule_set="guided").gradients["input"]
        heat = minmax(upsample(np.maximum(cam, 0), spatial_size(ctx.x, ctx.layout)))
        attribution = (guided * _channel_broadcast(heat, ctx.layout)).astype(np.float32)
        return CamParts(cam, weights, res.target_index, {"attribution": attribution},
                        objective_is_class=ctx.objective.kind == "output")


class ClassCam(CamVariant):
    name = "cam"

    def compute(self, ctx: CamContext) -> CamParts:
        scores_t = _class_target(ctx)
        # the head first: a model without one is told so, whatever layer is named (naming a layer
        # was told to name "the pooled feature map" of a pooling the model does not have)
        weight = _linear_head_weights(ctx.model, scores_t)
        head = default_layer(ctx.model, scores_t)
        if ctx.layer != head.layer:
            raise InvalidArgument("layer", f"CAM uses the weights of the linear layer after the global pooling, so the "
                                           f"layer must be the pooled feature map {head.layer!r}, not {ctx.layer!r}")
        values = forward_tensors(ctx, ctx.feeds, [ctx.layer, scores_t])
        idx = class_indices(ctx, values[scores_t], scores_t)
        if (idx >= weight.shape[0]).any():
            raise InvalidArgument("target.output.index", f"must be in [0, {weight.shape[0]})")
        w = weight[idx].astype(np.float64)
        a = values[ctx.layer].astype(np.float64)
        return CamParts(np.einsum("nc,nchw->nhw", w, a), w, idx)


class ScoreCam(CamVariant):
    name = "scorecam"

    def compute(self, ctx: CamContext) -> CamParts:
        scores_t = _class_target(ctx)
        values = forward_tensors(ctx, ctx.feeds, [ctx.layer, scores_t])
        idx = class_indices(ctx, values[scores_t], scores_t)
        a = values[ctx.layer].astype(np.float64)
        n, c = a.shape[:2]
        hw = spatial_size(ctx.x, ctx.layout)
        lo = a.min(axis=(2, 3))
        hi = a.max(axis=(2, 3))
        pairs = np.argwhere(hi > lo)  # constant maps mask nothing useful: weight 0 (as the reference code)
        weights = np.zeros((n, c))
        total = len(pairs)
        ctx.progress.update(0, total, "masked inputs")
        for sl in batching.chunks(total, ctx.batch):
            rows, chans = pairs[sl, 0], pairs[sl, 1]
            masks = minmax(upsample(a[rows, chans], hw))
            masked = (ctx.x[rows] * _channel_broadcast(masks, ctx.layout)).astype(ctx.x.dtype)
            run_feeds = _repeat_feeds(ctx, rows, masked)
            out = forward_tensors(ctx, run_feeds, [scores_t])[scores_t]
            require_rows(scores_t, out, len(run_feeds[ctx.model.image_input]))
            out = out[:len(rows)]
            probs = class_probabilities(ctx.model, scores_t, out).reshape(len(rows), -1)
            weights[rows, chans] = probs[np.arange(len(rows)), idx[rows]]
            ctx.progress.update(sl.stop, total, "masked inputs")
        return CamParts(np.einsum("nc,nchw->nhw", weights, a), weights, idx)


class AblationCam(CamVariant):
    name = "ablationcam"

    def compute(self, ctx: CamContext) -> CamParts:
        scores_t = _class_target(ctx)
        values = forward_tensors(ctx, ctx.feeds, [ctx.layer, scores_t])
        idx = class_indices(ctx, values[scores_t], scores_t)
        a = values[ctx.layer]
        n, c = a.shape[:2]
        y = values[scores_t].reshape(n, -1)[np.arange(n), idx].astype(np.float64)
        key = ("after", ctx.layer, (scores_t,))

        def build():
            cut = graph_after(ctx.model.proto, ctx.layer, [scores_t])
            return cut.model, cut

        session = ctx.runtime.session(ctx.model.graph_id, key, build)
        sub = session.meta
        pairs = np.argwhere(np.ones((n, c), dtype=bool))
        total = len(pairs)
        y_k = np.zeros((n, c))
        ctx.progress.update(0, total, "ablated channels")
        for sl in batching.chunks(total, ctx.batch):
            rows, chans = pairs[sl, 0], pairs[sl, 1]
            ablated = a[rows].copy()
            ablated[np.arange(len(rows)), chans] = 0
            feeds = {k: v for k, v in batching.row_feeds(ctx.model, ctx.feeds, rows).items() if k in sub.extra_inputs}
            feeds[ctx.layer] = batching.padded(ctx.model, ablated)
            out = session.run_dict([scores_t], feeds)[scores_t]
            require_rows(scores_t, out, len(feeds[ctx.layer]))
            out = out[:len(rows)].reshape(len(rows), -1)
            y_k[rows, chans] = out[np.arange(len(rows)), idx[rows]]
            ctx.progress.update(sl.stop, total, "ablated channels")
        # the paper's relative drop; an absolute drop where the score itself is ~0
        denom = np.where(np.abs(y) > 1e-6, y, 1.0)[:, None]
        weights = (y[:, None] - y_k) / denom
        return CamParts(np.einsum("nc,nchw->nhw", weights, a.astype(np.float64)), weights, idx,
                        extra={"separates": np.asarray([sub.separates])})


VARIANTS: dict[str, Callable[[], CamVariant]] = {
    cls.name: cls for cls in (GradCam, GradCamPlusPlus, LayerCam, GuidedGradCam, ClassCam, ScoreCam, AblationCam)}


def compute_cam(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray], method: str = "gradcam",
                layer: str = "", objective: Objective | None = None, batch: int = 0, preprocess=None,
                progress: Progress = NO_PROGRESS) -> MethodResult:
    """Run one CAM variant; result tensors as documented for LocalizationService.Cam."""
    method = method or "gradcam"
    if method not in VARIANTS:
        raise InvalidArgument("method", f"unknown method {method!r}; allowed: {', '.join(VARIANTS)}")
    if batch < 0:
        raise InvalidArgument("batch", f"must be >= 0 (0 = default {DEFAULT_BATCH}), got {batch}")
    objective = objective or Objective()
    x = feeds[model.image_input]
    layout = image_layout(model, x, preprocess)
    spatial_size(x, layout)
    # where the default layer is looked for: back from the class scores, or from a channel / neuron /
    # tensor target's own layer (from the first output, a detection model's boxes, it found none)
    scores = objective_tensor_name(model, Objective("output", objective.layer)) \
        if objective.kind == "output" else objective_tensor_name(model, objective)
    tensor = resolve_cam_layer(model, layer, scores)
    if objective.kind == "output":
        require_before(model, layer, tensor, scores, scores)
    elif issubclass(VARIANTS[method], GradientCam):  # forward variants refuse other targets themselves
        require_before(model, layer, tensor, objective_tensor_name(model, objective), scores)
    if layer:
        require_positions(model, layer, tensor)
    ctx = CamContext(runtime, model, feeds, tensor, objective, layout,
                     batching.run_size(model, batch or DEFAULT_BATCH), progress)
    progress.check()
    parts = VARIANTS[method]().compute(ctx)
    cam = np.maximum(parts.cam, 0)
    heat = minmax(upsample(cam, spatial_size(x, layout)))
    tensors = {"cam": cam.astype(np.float32), "heatmap": heat.astype(np.float32),
               "weights": np.asarray(parts.weights, dtype=np.float32), "input": x}
    labels = {}
    if parts.target_index is not None:
        tensors["target_index"] = np.asarray(parts.target_index, dtype=np.int64)
        if parts.objective_is_class and model.labels:
            labels["target_index"] = [model.label(int(i)) or "" for i in parts.target_index]
    for k, v in parts.extra.items():
        if k == "separates":
            continue
        tensors[k] = v
    text = {"layer": tensor, "method": method}
    blank = [i for i in range(len(cam)) if not cam[i].any()]
    if blank:   # a silent all-zero map read as "no evidence anywhere" without a word of why
        text["note"] = (f"image(s) {blank}: the weighted sum of the layer's maps is <= 0 at every position, so the "
                        "map (its positive part) is 0 everywhere: nothing at this layer speaks for the target; "
                        "gradcam++ / layercam weigh positive gradients only, another layer or target may show some")
    if "separates" in parts.extra:
        text["replay"] = "layer separates input and output" if bool(parts.extra["separates"][0]) \
            else "graph after the layer also reads the original input (a path bypasses the layer)"
    return MethodResult(tensors, {}, labels, text)
