"""Whole models: every light graph of the onnx wheel and every shared model builds a
checker-valid gradient graph that onnxruntime runs at batch 2, and its gradients
agree with directional finite differences (w.r.t. the input and, by the chain rule,
w.r.t. an intermediate tensor).

The light graphs carry constant-valued weights (ConstantOfShape), which make every
class score identical and activations overflow; the tests give them random He-scaled
weights so that finite differences mean something.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vis_service.engine import build_gradient_model
from vis_service.engine.verify import run_gradient, session
from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model, tensor_infos

SHARED_MODELS = Path(__file__).resolve().parents[1] / ".." / "shared" / "models"
LIGHT_MODELS = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_*.onnx")))
SHARED = sorted(glob.glob(str(SHARED_MODELS / "*" / "*.onnx")))
MODELS = [pytest.param(p, id=Path(p).stem) for p in LIGHT_MODELS + SHARED]


def test_shared_models_present():
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"shared models not found at {SHARED_MODELS.resolve()}")
    assert SHARED, f"no *.onnx under {SHARED_MODELS.resolve()}"


def randomize_constant_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace ConstantOfShape weight nodes by random initializers (He scale; positive 1-D)."""
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = [int(d) for d in inits[node.input[0]]]
            if len(shape) >= 2:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 2 else min(shape)
                value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            else:
                value = rng.uniform(0.5, 1.5, shape)
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def load(path: str) -> onnx.ModelProto:
    return prepare_model(randomize_constant_weights(onnx.load(path)))


def objective_of(model: onnx.ModelProto) -> str:
    """The logits: input of a final Softmax, else the first graph output."""
    last = model.graph.node[-1]
    return last.input[0] if last.op_type == "Softmax" else model.graph.output[0].name


def intermediate_of(model: onnx.ModelProto) -> str:
    """A 4-D activation about two thirds into the network."""
    infos = tensor_infos(model)
    candidates = [n.output[0] for n in model.graph.node
                  if n.op_type in ("Relu", "Clip", "Concat", "Add", "Sum", "MaxPool")
                  and infos.get(n.output[0]) is not None and len(infos[n.output[0]].shape or ()) == 4]
    return candidates[2 * len(candidates) // 3]


def batch_input(model: onnx.ModelProto, batch: int, rng) -> tuple[str, np.ndarray]:
    inp = model.graph.input[0]
    shape = [batch] + [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    return inp.name, rng.random(shape).astype(np.float32)


def relative_mismatch(directional: float, adjoint: float) -> float:
    return abs(directional - adjoint) / max(abs(directional), abs(adjoint), 1e-30)


@pytest.mark.parametrize("path", MODELS)
def test_model_gradients(path):
    model = load(path)
    objective, hidden = objective_of(model), intermediate_of(model)
    input_name = model.graph.input[0].name
    graph = build_gradient_model(model, [objective], [input_name, hidden], forward_outputs=[hidden])
    onnx.checker.check_model(graph.model)
    rng = np.random.default_rng(0)

    # batch 2 through the optimized session the service would use
    name, x2 = batch_input(model, 2, rng)
    sess = session(graph.model)
    y2 = sess.run([graph.forward_outputs[objective]],
                  {name: x2, graph.cotangent_inputs[objective]: _zeros_cotangent(graph, objective, 2)})[0]
    grads2 = run_gradient(graph, {name: x2}, {objective: np.ones_like(y2)})
    assert grads2[input_name].shape == x2.shape
    assert np.all(np.isfinite(grads2[input_name]))

    # directional finite differences at batch 1, unoptimized (no NCHWc argmax flips)
    _, x = batch_input(model, 1, rng)
    forward = session(expose_tensors(model, [objective, hidden]), optimize=False)
    y, h = forward.run(None, {name: x})
    cotangent = rng.standard_normal(y.shape).astype(np.float32)
    grads = run_gradient(graph, {name: x}, {objective: cotangent}, optimize=False)
    v = rng.standard_normal(x.shape).astype(np.float32)
    adjoint_input = float(np.sum(grads[input_name].astype(np.float64) * v))
    errors_input, errors_hidden = [], []
    # ReLU kinks make any one step unreliable on deep nets: accept the best of a few small steps
    for eps in (1e-3, 3e-4, 1e-4):
        y_plus, h_plus = forward.run(None, {name: x + eps * v})
        y_minus, h_minus = forward.run(None, {name: x - eps * v})
        dy = (y_plus.astype(np.float64) - y_minus) / (2 * eps)
        dh = (h_plus.astype(np.float64) - h_minus) / (2 * eps)
        errors_input.append(relative_mismatch(float(np.sum(dy * cotangent)), adjoint_input))
        # chain rule: <d obj/d h, dh/dx v> = <d obj/d x, v>
        errors_hidden.append(relative_mismatch(float(np.sum(grads[hidden].astype(np.float64) * dh)), adjoint_input))
    assert min(errors_input) < 0.03, errors_input
    assert min(errors_hidden) < 0.03, errors_hidden


def _zeros_cotangent(graph, objective: str, batch: int) -> np.ndarray:
    """Cotangents are graph inputs: a forward-only fetch still has to feed them."""
    vi = next(i for i in graph.model.graph.input if i.name == graph.cotangent_inputs[objective])
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
    return np.zeros(shape, np.float32)
