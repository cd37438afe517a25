"""Which tensor holds the class scores, and turning scores into probabilities.

Many exported classifiers end in a Softmax (SqueezeNet, MobileNet from TF). Gradients
of a probability saturate and mix classes, so methods differentiate the class
scores before the Softmax; probabilities (occlusion maps) are taken after it.
"""
from __future__ import annotations

import numpy as np
import onnx

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
