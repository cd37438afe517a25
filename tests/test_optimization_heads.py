"""The objective heads appended to the graph compute what their numpy references say.

Runs the head graph of the embedded digits model in onnxruntime (no server) and
compares values and the engine's gradients w.r.t. the head's input layer with the
numpy definitions (regularizers.gram_diversity, squares, softmax).
"""
from __future__ import annotations

import numpy as np
import pytest

from vis_service.engine.backward import build_gradient_model
from vis_service.methods.optimization import regularizers
from vis_service.methods.optimization.objectives import Head, with_heads
from vis_service.models.store import ModelStore
from vis_service.runtime.sessions import Runtime

LAYER = "mixed/concat"


@pytest.fixture(scope="module")
def digits_model(repository):
    runtime = Runtime()
    return runtime, ModelStore(runtime, repository).load("digits")


def _head_gradient(runtime, model, head, cot, x, extra=None):
    proto = with_heads(model, [head])
    gg = build_gradient_model(proto, [head.output], [head.tensor], forward_outputs=[head.tensor])
    sess = runtime.create_session(gg.model)
    feeds = {model.image_input: x, gg.cotangent_inputs[head.output]: cot.astype(np.float32), **(extra or {})}
    names = [gg.forward_outputs[head.output], gg.gradient_outputs[head.tensor], gg.forward_outputs[head.tensor]]
    return sess.run(names, feeds)


def test_gram_similarity_head_matches_numpy_diversity(digits_model):
    runtime, model = digits_model
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    b = 3
    cot = (1.0 - np.eye(b)) / b                       # value = sum_{i != j} S_ij / B
    s, grad, acts = _head_gradient(runtime, model, Head("gram_similarity", LAYER), cot, x)
    value, ref_grad = regularizers.gram_diversity(acts)
    assert float((s * cot).sum()) == pytest.approx(value, rel=1e-4)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-3, atol=1e-4 * np.abs(ref_grad).max())  # FP32 cancellation in tiny entries


def test_square_and_squared_difference_heads(digits_model):
    runtime, model = digits_model
    x = np.random.default_rng(1).standard_normal((2, 1, 32, 32)).astype(np.float32)
    cot = np.random.default_rng(2).random((2, 32, 16, 16))
    sq, grad, acts = _head_gradient(runtime, model, Head("square", LAYER), cot, x)
    np.testing.assert_allclose(sq, acts ** 2, rtol=1e-5)
    np.testing.assert_allclose(grad, 2 * acts * cot, rtol=1e-4, atol=1e-6)
    head = Head("squared_difference", LAYER)
    ref = np.random.default_rng(3).random(acts.shape).astype(np.float32)
    d2, grad, acts = _head_gradient(runtime, model, head, cot, x, {head.reference_input: ref})
    np.testing.assert_allclose(d2, (acts - ref) ** 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad, 2 * (acts - ref) * cot, rtol=1e-4, atol=1e-5)
