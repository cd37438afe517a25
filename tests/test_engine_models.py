"""Whole models: every light graph of the onnx wheel and every shared model.

1. The gradient graph (w.r.t. the input and an intermediate tensor) is checker-valid
   and onnxruntime runs it, optimized, at batch 2.
2. Gradients match directional finite differences taken in float64 with onnx's
   reference evaluator (float32 differences on deep ReLU nets are dominated by kinks
   and rounding): w.r.t. the input directly, w.r.t. the intermediate by the chain rule
   ⟨∂L/∂h, (∂h/∂x) v⟩ = ⟨∂L/∂x, v⟩. To keep the float64 reference fast, models with
   global pooling run at a reduced input size, and fixed-size ones are checked up to
   an activation in their first half.

The light graphs carry constant-valued weights (ConstantOfShape): every class score is
identical and activations overflow, so the tests give them random He-scaled weights.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from vis_service.engine import build_gradient_model
from _engine_helpers import run_gradient, session
from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import opset_version, prepare_model, tensor_infos

SHARED_MODELS = Path(__file__).resolve().parents[1] / ".." / "shared" / "models"
LIGHT_MODELS = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_*.onnx")))
SHARED = sorted(glob.glob(str(SHARED_MODELS / "*" / "*.onnx")))
MODELS = [pytest.param(p, id=Path(p).stem) for p in LIGHT_MODELS + SHARED]

# models that accept a smaller square input (global pooling before the classifier)
REDUCED_INPUT = {"light_squeezenet": 64, "squeezenet1.0": 64, "light_densenet121": 64, "mobilenet_v1_0.75_192": 64}
# models small enough for a float64 reference pass at full size, up to the logits
FULL_SIZE = {"resnet20", "mnist-8"}
# reshapes with hard-coded spatial sizes: checked at their native input size
FIXED_SPATIAL = {"light_shufflenet"}


def test_shared_models_present():
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"shared models not found at {SHARED_MODELS.resolve()}")
    assert SHARED, f"no *.onnx under {SHARED_MODELS.resolve()}"


MAX_RANDOMIZED = 1 << 22


def randomize_constant_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace ConstantOfShape weight nodes by random initializers (He scale; positive 1-D)."""
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        shape = [int(d) for d in inits[node.input[0]]] if node.op_type == "ConstantOfShape" and node.input[0] in inits else None
        # the classifiers' largest matrices (up to 400 MB) stay constant: copying them would dominate the test
        if shape is not None and np.prod(shape) <= MAX_RANDOMIZED:
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


def load(path: str, input_size: int | None = None) -> onnx.ModelProto:
    model = randomize_constant_weights(onnx.load(path))
    if input_size is not None:
        inits = {t.name for t in model.graph.initializer}
        image = next(i for i in model.graph.input if i.name not in inits)
        for d in image.type.tensor_type.shape.dim[2:]:
            d.dim_value = input_size
        del model.graph.value_info[:]
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")
    return prepare_model(model)


def activations(model: onnx.ModelProto) -> list[str]:
    """4-D outputs of activation/merge nodes, in graph order."""
    infos = tensor_infos(model)
    return [n.output[0] for n in model.graph.node
            if n.op_type in ("Relu", "Clip", "Concat", "Add", "Sum", "MaxPool", "LRN")
            and infos.get(n.output[0]) is not None and len(infos[n.output[0]].shape or ()) == 4]


def separates(model: onnx.ModelProto, source: str, target: str, tensor: str) -> bool:
    """Every path from `source` to `target` passes through `tensor` (chain rule holds through it)."""
    reached = {source}
    for node in model.graph.node:
        if any(i in reached and i != tensor for i in node.input):
            reached.update(node.output)
    return target not in reached


def hidden_between(model: onnx.ModelProto, objective: str, position: float) -> str:
    """An activation about `position` of the way to `objective` that all paths pass through."""
    source = model.graph.input[0].name
    acts = activations(model)
    acts = acts[:acts.index(objective)] if objective in acts else acts
    order = sorted(range(len(acts)), key=lambda i: abs(i - position * len(acts)))
    return next(acts[i] for i in order if separates(model, source, objective, acts[i]))


def logits(model: onnx.ModelProto) -> str:
    """Input of a final Softmax, else the first graph output."""
    last = model.graph.node[-1]
    return last.input[0] if last.op_type == "Softmax" else model.graph.output[0].name


def image_input(model: onnx.ModelProto, batch: int, rng) -> tuple[str, np.ndarray]:
    inp = model.graph.input[0]
    shape = [batch] + [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    return inp.name, rng.random(shape).astype(np.float32)


def zeros_cotangent(graph, objective: str, batch: int) -> np.ndarray:
    """Cotangents are graph inputs: a forward-only fetch still has to feed them."""
    vi = next(i for i in graph.model.graph.input if i.name == graph.cotangent_inputs[objective])
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("path", MODELS)
def test_gradient_graph_runs_at_batch_2(path):
    model = load(path)
    objective = logits(model)
    hidden = hidden_between(model, objective, 0.5)
    name = model.graph.input[0].name
    graph = build_gradient_model(model, [objective], [name, hidden], forward_outputs=[hidden])
    onnx.checker.check_model(graph.model)
    _, x = image_input(model, 2, np.random.default_rng(0))
    sess = session(graph.model)
    y = sess.run([graph.forward_outputs[objective]], {name: x, graph.cotangent_inputs[objective]: zeros_cotangent(graph, objective, 2)})[0]
    grads = run_gradient(graph, {name: x}, {objective: np.ones_like(y)})
    assert grads[name].shape == x.shape
    assert grads[hidden].shape[0] == 2
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert np.any(grads[name] != 0)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for vi in list(out.graph.input) + list(out.graph.output) + list(out.graph.value_info):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return out


def resized(model: onnx.ModelProto, input_size: int) -> onnx.ModelProto:
    """Same model with a square input of `input_size` (shapes re-inferred)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = input_size
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return prepare_model(model)


def reference_case(path: str) -> tuple[onnx.ModelProto, str, str]:
    """(model, objective, hidden) small enough for a float64 reference pass."""
    stem = Path(path).stem
    if stem in REDUCED_INPUT:
        model = load(path, REDUCED_INPUT[stem])
        return model, logits(model), hidden_between(model, logits(model), 0.5)
    model = load(path)
    if stem in FULL_SIZE:
        return model, logits(model), hidden_between(model, logits(model), 0.5)
    # fixed-size classifier: cut the network in its first half, then shrink the input
    acts = activations(model)
    objective = acts[len(acts) // 3]
    hidden = hidden_between(model, objective, 0.5)
    name = model.graph.input[0].name
    cut = onnx.utils.Extractor(model).extract_model([name], [objective, hidden])
    return (cut if stem in FIXED_SPATIAL else resized(cut, 64)), objective, hidden


class SpecLRN(OpRun):
    """LRN as the ONNX spec and onnxruntime define it (onnx 1.23's reference deviates)."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha, beta = alpha or 1e-4, beta or 0.75
        bias = 1.0 if bias is None else bias
        squares = x.astype(np.float64) ** 2
        window = np.zeros_like(squares)
        channels = x.shape[1]
        for c in range(channels):
            low, high = max(0, c - (size - 1) // 2), min(channels - 1, c + size // 2)
            window[:, c] = squares[:, low:high + 1].sum(axis=1)
        return ((x / (bias + alpha / size * window) ** beta).astype(x.dtype),)


SpecLRN.__name__ = "LRN"


def float64_reference(model: onnx.ModelProto, outputs: list[str]) -> ReferenceEvaluator:
    # onnx's reference BatchNormalization-9 differs from onnxruntime's; compare modern forms
    modern = version_converter.convert_version(model, max(16, opset_version(model)))
    name = model.graph.input[0].name
    return ReferenceEvaluator(to_float64(onnx.utils.Extractor(expose_tensors(prepare_model(modern), outputs))
                                         .extract_model([name], outputs)), new_ops=[SpecLRN])


@pytest.mark.parametrize("path", MODELS)
def test_gradients_match_float64_differences(path):
    model, objective, hidden = reference_case(path)
    name = model.graph.input[0].name
    graph = build_gradient_model(model, [objective], [name, hidden])
    reference = float64_reference(model, [objective, hidden])
    rng = np.random.default_rng(1)
    _, x = image_input(model, 1, rng)
    y, _ = reference.run(None, {name: x.astype(np.float64)})
    cotangent = rng.standard_normal(y.shape).astype(np.float32)
    grads = run_gradient(graph, {name: x}, {objective: cotangent}, optimize=False)
    v = rng.standard_normal(x.shape)
    eps = 1e-6
    y_plus, h_plus = reference.run(None, {name: x + eps * v})
    y_minus, h_minus = reference.run(None, {name: x - eps * v})
    directional = float(np.sum((y_plus - y_minus) / (2 * eps) * cotangent))
    adjoint = float(np.sum(grads[name] * v))
    through_hidden = float(np.sum((h_plus - h_minus) / (2 * eps) * grads[hidden]))
    # float32 gradients summed against random directions: compare to the sum of magnitudes
    scale = float(np.sum(np.abs(grads[name] * v)))
    assert abs(directional - adjoint) < 1e-3 * scale, (directional, adjoint, scale)
    assert abs(through_hidden - adjoint) < 1e-3 * scale, (through_hidden, adjoint, scale)


# VGG-19 and ZFNet add no op kind to AlexNet's, only 20 s
@pytest.mark.parametrize("path", [p for p in MODELS if p.id not in ("light_vgg19", "light_zfnet512")])
def test_batch_summed_input_gradient_is_the_row_sum(path):
    """IG and SmoothGrad's batch-summed graphs (linear stem on the summed gradient, max-pool
    switches scattered into one sample) give the sum of the per-row input gradients."""
    model = load(path)
    objective = logits(model)
    name = model.graph.input[0].name
    _, x = image_input(model, 2, np.random.default_rng(1))
    out = {}
    for summed in (False, True):
        graph = build_gradient_model(model, [objective], [name], batch_summed=[name] if summed else [])
        sess = session(graph.model)
        y = sess.run([graph.forward_outputs[objective]],
                     {name: x, graph.cotangent_inputs[objective]: zeros_cotangent(graph, objective, 2)})[0]
        cot = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
        out[summed] = run_gradient(graph, {name: x}, {objective: cot})[name]
    assert out[True].shape == (1,) + x.shape[1:]
    row_sum = out[False].astype(np.float64).sum(axis=0)
    scale = np.abs(out[False]).max()
    np.testing.assert_allclose(out[True][0], row_sum, rtol=0, atol=1e-4 * scale)
