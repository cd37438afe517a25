"""Which tensor holds the class scores, turning scores into probabilities, and what a
target may name.

Many exported classifiers end in a Softmax (SqueezeNet, MobileNet from TF), a LogSoftmax, or
a Sigmoid (multi-label). Gradients of a probability saturate and mix classes, so methods
differentiate the class scores before it; probabilities (occlusion maps, Score-CAM) are
taken as the model takes them (`class_probabilities`).

A target (or an objective, a CAM layer) is an activation: a tensor computed from the
model's inputs. Weights (initializers) and tensors made from weights only are refused by
name (`require_activation`), before the gradient engine would say that the input does
not influence them. What picks a channel takes [N, C, H, W] maps: a channels-last tensor
(ConvNeXt's blocks, tf2onnx's NHWC views) is refused naming a channels-first one near it
(`require_channels_first`): its axis 1 holds rows.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import InvalidArgument
from ..graph.loading import opset_version
from ..graph.paths import dependents
from ..graph.receptive_field import spatial_axes
from ..models.store import LoadedModel

# ops that only reshape or pass the scores on their way to the graph output
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


_PROBABILITY_OPS = ("Softmax", "LogSoftmax", "Sigmoid")


def probability_node(model: LoadedModel, output: str | None = None) -> onnx.NodeProto | None:
    """The Softmax, LogSoftmax or Sigmoid (multi-label) that `output` (default: first output) is made
    by, through reshapes."""
    producers = _producers(model.proto)
    name = output or model.output_names[0]
    while name in producers:
        node = producers[name]
        if node.op_type in _PROBABILITY_OPS:
            return node
        if node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def class_scores_tensor(model: LoadedModel, output: str | None = None) -> str:
    """Pre-activation scores if the output is a Softmax, LogSoftmax or Sigmoid of them, else the output
    itself (gradients of probabilities saturate)."""
    def find():
        node = probability_node(model, output)
        return node.input[0] if node is not None else (output or model.output_names[0])

    if output:
        return find()
    return model.memo("class_scores_tensor", find)


def class_probabilities(model: LoadedModel, tensor: str, values: np.ndarray) -> np.ndarray:
    """Class probabilities (float64, the shape of `values`) from the values of `tensor`, a class-scores
    tensor or an output made of one:
    - made by a Softmax or Sigmoid (a probability output named as the target): the values;
      by a LogSoftmax: their exp;
    - read by the model's own Softmax / LogSoftmax / Sigmoid (the pre-activation scores the methods
      target): that function, along its axis (a segmentation model's classes per pixel);
    - neither: one score per sample is a binary logit (its sigmoid; a softmax over one entry was a
      constant 1); [N, classes, ...] scores per position (dense prediction) take a softmax over the
      classes at each position; else over all entries of a sample.
    """
    v = values.astype(np.float64)
    kind, axis, coerced = model.memo_per("probability_kind", tensor, lambda: _probability_kind(model, tensor))
    if kind == "values":
        return v
    if kind == "exp":
        return np.exp(v)
    if kind == "sigmoid" or (kind == "default" and v[0].size == 1):
        return 0.5 * (1.0 + np.tanh(0.5 * v))  # the sigmoid, without exp's overflow far below 0
    if kind == "softmax":
        axis %= max(1, v.ndim)
        if coerced:  # Softmax-1/11: the input coerced to 2-D at `axis`, a softmax over the rest
            return _softmax_along(v.reshape(v.shape[:axis] + (-1,)), -1).reshape(v.shape)
        return _softmax_along(v, axis)
    if v.ndim >= 3:
        return _softmax_along(v, 1)
    return _softmax_along(v.reshape(v.shape[0], -1), 1).reshape(v.shape)


def _probability_kind(model: LoadedModel, tensor: str) -> tuple[str, int, bool]:
    """How class_probabilities turns `tensor`'s values into probabilities, looked up in the graph once
    per tensor (occlusion asks on every batch of patches): ("values" | "exp" | "sigmoid" | "softmax" |
    "default", softmax axis, whether an old Softmax coerces its input to 2-D at that axis)."""
    made_by = probability_node(model, tensor)
    if made_by is not None:
        return ("exp" if made_by.op_type == "LogSoftmax" else "values"), 0, False
    reader = next((n for n in model.proto.graph.node if n.op_type in _PROBABILITY_OPS and n.input and n.input[0] == tensor
                   and n.domain in ("", "ai.onnx")), None)
    if reader is None:
        return "default", 0, False
    if reader.op_type == "Sigmoid":
        return "sigmoid", 0, False
    opset = opset_version(model.proto)
    return "softmax", next((a.i for a in reader.attribute if a.name == "axis"), -1 if opset >= 13 else 1), opset < 13


def _softmax_along(v: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def top_channels(values: np.ndarray) -> np.ndarray:
    """Each sample's top channel of a [N, C, ...] activation: the channel with the largest sum
    over all positions, i.e. the largest channel-target objective (ties: the lowest index, as
    numpy's argmax). A 2-D [N, C] tensor has one position per channel."""
    n, c = values.shape[:2]
    return values.reshape(n, c, -1).sum(axis=2, dtype=np.float64).argmax(axis=1).astype(np.int64)


def computed_from_inputs(model: LoadedModel) -> set[str]:
    """Every tensor computed from the graph's inputs (the inputs included): the activations."""
    return model.memo("computed_from_inputs", lambda: dependents(model.proto.graph, model.input_names))


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def require_activation(model: LoadedModel, tensor: str, field: str, given: str = "",
                       differentiable: bool = False) -> None:
    """INVALID_ARGUMENT naming `field` unless `tensor` is computed from the model's inputs, and, where
    it is differentiated (`differentiable`), a float tensor (a quantized model's integer tensors were
    refused deep in the engine, naming its own field and an internal tensor)."""
    named = repr(given or tensor) + (f" (tensor {tensor!r})" if given and given != tensor else "")
    if tensor in computed_from_inputs(model):
        info = model.infos.get(tensor)
        if differentiable and info is not None and info.elem_type not in _FLOAT_TYPES:
            kind = onnx.TensorProto.DataType.Name(info.elem_type)
            raise InvalidArgument(field, f"{named} is an integer tensor ({kind}, e.g. a quantized model's), which no "
                                         "gradient flows through; name a float layer (in a QDQ model a "
                                         "DequantizeLinear output; an operator-form quantized model has none inside)")
        return
    if any(t.name == tensor for t in model.proto.graph.initializer):
        what = "is a weight (initializer), not an activation"
    else:
        what = "is computed from weights only (a constant), not an activation"
    raise InvalidArgument(field, f"{named} {what}; name a layer output computed from the input")


def traced_axes(model: LoadedModel) -> dict[str, tuple[int, int]]:
    """Rank-4 tensor -> its (row, column) axes as traced from the image input (computed once per model)."""
    return model.memo("spatial_axes", lambda: spatial_axes(model.proto))


def layout_of(model: LoadedModel, tensor: str) -> str | None:
    """"NCHW" or "NHWC" for a rank-4 tensor traced from the image input; None where not traced."""
    return {(2, 3): "NCHW", (1, 2): "NHWC"}.get(tuple(traced_axes(model).get(tensor, ())))


def channels_last(model: LoadedModel, tensor: str) -> bool:
    """True for a rank-4 tensor traced with its rows and columns on axes other than 2 and 3."""
    axes = traced_axes(model).get(tensor)
    return axes is not None and tuple(axes) != (2, 3)


def batch_axis_lost(model: LoadedModel, tensor: str) -> bool:
    """True for a tensor whose first axis cannot be the images' batch: a fixed size where the image
    input's batch is free, or another fixed size (tf2onnx's Keras LayerNormalization folds the batch
    into a [1, N*H*W, C, 1] tensor, which looked like a feature map)."""
    image = model.infos.get(model.image_input) if model.image_input else None
    info = model.infos.get(tensor)
    if image is None or not image.shape or info is None or not info.shape:
        return False
    batch, first = image.shape[0], info.shape[0]
    return isinstance(first, int) and (isinstance(batch, str) or (isinstance(batch, int) and first != batch))


def require_rows(tensor: str, values: np.ndarray, rows: int) -> None:
    """INVALID_ARGUMENT on `target` unless a run's values of `tensor` have one row per image fed: a
    detection model's outputs ([detections, ...], their count varying with the input; declared with a
    symbol shape inference made up) were an IndexError deep in occlusion and the forward CAMs, or, where
    the count happened to fit, silently some detection's score."""
    if values.ndim == 0 or values.shape[0] != rows:
        raise InvalidArgument("target", f"tensor {tensor!r} came out of shape {list(values.shape)} for {rows} images: "
                                        "its first axis is not the batch (e.g. a detection model's detections), and "
                                        "targets are taken per sample of [N, ...] tensors")


def require_from_image(model: LoadedModel, tensor: str, field: str, given: str = "") -> None:
    """INVALID_ARGUMENT naming `field` for a tensor the image input does not influence (a siamese
    model's other branch, an auxiliary input's): its map drawn over the image explains nothing (a
    Grad-CAM of the other image's branch was returned over this one, occlusion a near-constant map)."""
    image = model.image_input
    if not image or tensor in model.memo("computed_from_image", lambda: dependents(model.proto.graph, [image])):
        return
    named = repr(given or tensor) + (f" (tensor {tensor!r})" if given and given != tensor else "")
    raise InvalidArgument(field, f"{named} is not computed from the image input {image!r} (it depends on the "
                                 "model's other inputs only); name a layer on the image's path")


def require_batch_first(model: LoadedModel, tensor: str, field: str, given: str = "") -> None:
    """INVALID_ARGUMENT naming `field` for a tensor declared without the images' batch as its first
    axis (a scalar, a rank-1 [classes] output of a model exported for one image): what is taken per
    sample of it (a class score, a probability, an inverted layer's features) was an IndexError or a
    broadcast error (INTERNAL) in the methods that run it forward."""
    info = model.infos.get(tensor)
    shape = None if info is None else info.shape
    if shape is None or (len(shape) and not batch_axis_lost(model, tensor)):
        return
    named = repr(given or tensor) + (f" (tensor {tensor!r})" if given and given != tensor else "")
    raise InvalidArgument(field, f"{named} of shape {list(shape)} has no batch dimension; it is taken per sample "
                                 "of [N, ...] tensors (export the model with the batch axis kept)")


def require_channels_first(model: LoadedModel, tensor: str, field: str, given: str = "") -> None:
    """INVALID_ARGUMENT naming `field` for a rank-4 tensor whose rows and columns are not axes 2
    and 3 (a channels-last [N, H, W, C] tensor, as `graph.receptive_field.spatial_axes` traces
    them): channel and neuron targets, CAM and deconvnet layers read axis 1 as the channels,
    which there are rows (a ConvNeXt block's channel 5 was its sixth row, without an error); also
    for a tensor whose first axis is not the batch (they read axis 0 as the images)."""
    if batch_axis_lost(model, tensor):
        named = repr(given or tensor) + (f" (tensor {tensor!r})" if given and given != tensor else "")
        shape = list(model.infos[tensor].shape)
        raise InvalidArgument(field, f"{named} has shape {shape}: its first axis is not the images' batch "
                                     f"({model.infos[model.image_input].shape[0]!r}), the images are folded into "
                                     "other axes; name a layer that keeps them apart")
    axes_of = traced_axes(model)
    named = repr(given or tensor) + (f" (tensor {tensor!r})" if given and given != tensor else "")
    info = model.infos.get(tensor)
    if (tensor not in axes_of and info is not None and info.shape is not None and len(info.shape) == 4
            and tuple(axes_of.get(model.image_input or "", ())) not in ((), (2, 3))):
        # a channels-last model (Keras via tf2onnx) whose tensor lost its trace at a reshape or a Dense
        # layer (a LayerNormalization's, a ConvNeXt block's): [N, H, W, C] there as elsewhere in it, read
        # as [N, C, H, W] it had its rows taken for channels, without an error
        near = _nearest_channels_first(model, tensor, axes_of)
        hint = f": e.g. {near!r}, the nearest channels-first tensor" if near else ""
        raise InvalidArgument(field, f"{named} could not be traced to [N, C, H, W] (its axes are lost at a reshape "
                                     f"or a Dense layer) in a model that takes channels-last images: it is likely "
                                     f"[N, H, W, C]; channels are picked from tensors traced to [N, C, H, W]{hint}")
    if not channels_last(model, tensor):
        return
    axes = axes_of[tensor]
    near = _nearest_channels_first(model, tensor, axes_of)
    hint = f": e.g. {near!r}, the nearest channels-first tensor" if near else ""
    raise InvalidArgument(field, f"{named} is channels-last [N, H, W, C] (rows and columns on axes {axes[0]} and "
                                 f"{axes[1]}); channels are picked from [N, C, H, W] tensors{hint}")


def _nearest_channels_first(model: LoadedModel, tensor: str, axes_of: dict) -> str | None:
    """The channels-first tensor fewest nodes away from `tensor` in the graph, either way."""
    g = model.proto.graph
    producers = _producers(model.proto)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen, frontier = {tensor}, [tensor]
    while frontier:
        found = [t for t in frontier if tuple(axes_of.get(t, ())) == (2, 3)]
        if found:
            return found[0]
        nxt = []
        for t in frontier:
            node = producers.get(t)
            neighbours = list(node.input) if node is not None else []
            neighbours += [o for n in consumers.get(t, []) for o in n.output]
            # through untraced tensors too (a LayerNormalization's reshapes), to the traced ones
            nxt += [x for x in neighbours if x and x not in seen and (x in axes_of or x in model.infos)]
            seen.update(nxt)
        frontier = nxt
    return None
