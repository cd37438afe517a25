"""Numerical checks of backward graphs against onnxruntime itself (used by the tests).

The adjoint (dot-product) test compares ⟨J v, w⟩, with J v from central differences
of the forward model, against ⟨v, Jᵀ w⟩ from the gradient graph: it checks every
rule on random directions without ever forming a Jacobian.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model
from vis_service.engine.backward import GradientGraph, build_gradient_model


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def one_node_model(op_type: str, inputs: Mapping[str, Sequence[int]], constants: Mapping[str, np.ndarray] | None = None,
                   *, opset: int, dtype=np.float32, n_outputs: int = 1, input_order: Sequence[str] | None = None,
                   **attrs) -> onnx.ModelProto:
    """Model with one node; `inputs` maps graph-input names to shapes, `constants` to initializer values.

    Node inputs follow `input_order` (names from either mapping, "" for an omitted optional input).
    """
    constants = dict(constants or {})
    order = list(input_order) if input_order is not None else list(inputs) + list(constants)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, order, outputs, name=f"{op_type.lower()}_node", **attrs)
    graph = helper.make_graph(
        [node], "one_node",
        [helper.make_tensor_value_info(name, elem, list(shape)) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(o, elem, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return prepare_model(model, symbolic_batch=False)


@dataclass
class AdjointResult:
    directional: float     # ⟨J v, w⟩ by central differences
    adjoint: float         # ⟨v, Jᵀ w⟩ from the gradient graph
    scale: float           # magnitude for a relative comparison

    @property
    def relative_error(self) -> float:
        return abs(self.directional - self.adjoint) / max(self.scale, 1e-12)


def adjoint_check(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], objectives: Sequence[str],
                  wrt: Sequence[str], *, eps: float, seed: int = 0, rule_set: str = "gradient",
                  graph: GradientGraph | None = None) -> AdjointResult:
    """Dot-product test of the gradient graph of `model` at `feeds`.

    `wrt` may name graph inputs only (they are what central differences can perturb).
    """
    rng = np.random.default_rng(seed)
    graph = graph or build_gradient_model(model, objectives, wrt, rule_set=rule_set)
    forward = session(expose_tensors(model, list(objectives)), optimize=False)
    base = forward.run(None, dict(feeds))
    directions = {name: np.asarray(rng.standard_normal(feeds[name].shape), dtype=feeds[name].dtype) for name in wrt}
    cotangents = [np.asarray(rng.standard_normal(b.shape), dtype=b.dtype) for b in base]
    plus = forward.run(None, {**feeds, **{n: np.asarray(feeds[n] + eps * v) for n, v in directions.items()}})
    minus = forward.run(None, {**feeds, **{n: np.asarray(feeds[n] - eps * v) for n, v in directions.items()}})
    directional = sum(float(np.sum((p.astype(np.float64) - m) / (2 * eps) * w)) for p, m, w in zip(plus, minus, cotangents))
    grads = run_gradient(graph, feeds, dict(zip(objectives, cotangents)))
    adjoint = sum(float(np.sum(grads[n].astype(np.float64) * directions[n])) for n in wrt)
    scale = sum(float(np.sum(np.abs(grads[n].astype(np.float64) * directions[n]))) for n in wrt)
    return AdjointResult(directional, adjoint, scale)


def run_gradient(graph: GradientGraph, feeds: Mapping[str, np.ndarray], cotangents: Mapping[str, np.ndarray],
                 optimize: bool = True) -> dict[str, np.ndarray]:
    """wrt name -> gradient array."""
    sess = session(graph.model, optimize)
    inputs = {i.name for i in graph.model.graph.input}
    full = {k: v for k, v in feeds.items() if k in inputs}
    full.update({graph.cotangent_inputs[name]: value for name, value in cotangents.items()})
    names = list(graph.gradient_outputs)
    values = sess.run([graph.gradient_outputs[n] for n in names], full)
    return dict(zip(names, values))
