"""Which tensor holds the class scores, turning scores into probabilities, and what a
target may name.

Many exported classifiers end in a Softmax (SqueezeNet, MobileNet from TF). Gradients
of a probability saturate and mix classes, so methods differentiate the class
scores before the Softmax; probabilities (occlusion maps) are taken after it.

A target (or an objective, a CAM layer) is an activation: a tensor computed from the
model's inputs. Weights (initializers) and tensors made from weights only are refused by
name (`require_activation`), before the gradient engine would say that the input does
not influence them.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import InvalidArgument
from ..graph.paths import dependents
from ..models.store import LoadedModel

# ops that only reshape or pass the scores on their way to the graph output
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def softmax_node(model: LoadedModel, output: str | None = None) -> onnx.NodeProto | None:
    """The Softmax that `output` (default: first output) is made by, through reshapes."""
    producers = _producers(model.proto)
    name = output or model.output_names[0]
    while name in producers:
        node = producers[name]
        if node.op_type == "Softmax":
            return node
        if node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def class_scores_tensor(model: LoadedModel, output: str | None = None) -> str:
    """Pre-softmax scores if the output is a Softmax of them, else the output itself."""
    def find():
        node = softmax_node(model, output)
        return node.input[0] if node is not None else (output or model.output_names[0])

    if output:
        return find()
    return model.memo("class_scores_tensor", find)


def output_is_probability(model: LoadedModel, output: str | None = None) -> bool:
    return softmax_node(model, output) is not None


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over all non-batch entries of each sample."""
    flat = scores.reshape(scores.shape[0], -1).astype(np.float64)
    flat = flat - flat.max(axis=1, keepdims=True)
    e = np.exp(flat)
    return (e / e.sum(axis=1, keepdims=True)).reshape(scores.shape)


def top_channels(values: np.ndarray) -> np.ndarray:
    """Each sample's top channel of a [N, C, ...] activation: the channel with the largest sum
    over all positions, i.e. the largest channel-target objective (ties: the lowest index, as
    numpy's argmax). A 2-D [N, C] tensor has one position per channel."""
    n, c = values.shape[:2]
    return values.reshape(n, c, -1).sum(axis=2, dtype=np.float64).argmax(axis=1).astype(np.int64)


def computed_from_inputs(model: LoadedModel) -> set[str]:
    """Every tensor computed from the graph's inputs (the inputs included): the activations."""
    return model.memo("computed_from_inputs", lambda: dependents(model.proto.graph, model.input_names))


def require_activation(model: LoadedModel, tensor: str, field: str, given: str = "") -> None:
    """INVALID_ARGUMENT naming `field` unless `tensor` is computed from the model's inputs."""
    if tensor in computed_from_inputs(model):
        return
    named = repr(given or tensor) + (f" (tensor {tensor!r})" if given and given != tensor else "")
    if any(t.name == tensor for t in model.proto.graph.initializer):
        what = "is a weight (initializer), not an activation"
    else:
        what = "is computed from weights only (a constant), not an activation"
    raise InvalidArgument(field, f"{named} {what}; name a layer output computed from the input")
