"""The Gradient call: targets, rule sets and the in-graph top-1 target."""
from __future__ import annotations

import grpc
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import SHARED_IMAGES, raw_status, requires_shared
from vis_client import Target, VisError


def _tiny_model(opset: int) -> bytes:
    rng = np.random.default_rng(opset)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["scores"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", 5])], [w, fc])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7).SerializeToString()


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_top1_in_graph_equals_explicit_target(client, opset):
    """The default target (top-1) is found inside the gradient run; it must equal asking
    for the argmax class explicitly (older opsets use the attribute forms of Squeeze)."""
    model = client.load_model(_tiny_model(opset))
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    scores = client.activations(model, x, ["scores"])["scores"]
    top = client.gradient(model, x, None)
    assert list(top.target_index) == list(scores.argmax(1))
    np.testing.assert_allclose(top.objective, scores.max(1), rtol=1e-6)
    explicit = client.gradient(model, x, list(scores.argmax(1)))
    np.testing.assert_allclose(top.gradient, explicit.gradient, rtol=1e-6, atol=1e-7)


def test_top1_costs_one_session_and_no_forward_run(client, digits, digit_images):
    client.gradient(digits, digit_images[:2], None, rule_set="guided")
    built = client.server_info()["sessions_built"]
    for _ in range(3):
        res = client.gradient(digits, digit_images, None, rule_set="guided")
    assert client.server_info()["sessions_built"] == built
    assert list(res.target_index) == [int(p.stem.split("_")[1]) for p in digit_images]
    assert res.labels == [p.stem.split("_")[1] for p in digit_images]


@pytest.mark.parametrize("target", [None, 3, "channel", "tensor"])
def test_a_batch_over_the_memory_budget_runs_in_several_runs_with_progress(client, digits, digit_images, target):
    """A Gradient batch whose activations exceed the memory budget runs a few samples per
    onnxruntime run (the whole batch was one run: 256 VGG-sized images would have taken tens of
    GB), streams progress after each, and gives what each image gives alone."""
    images = digit_images[:5]
    acts = client.activations(digits, images, ["relu3"])["relu3"]
    objective, cotangent = {None: (None, None), 3: (3, None), "channel": (Target.channel("relu3", 4), None),
                            "tensor": ("relu3", np.random.default_rng(0).standard_normal(acts.shape).astype(np.float32))}[target]
    events = []
    # 1 byte: one sample per run
    res = client.gradient(digits, images, objective, wrt=["input", "relu3"], cotangent=cotangent,
                          memory_budget_bytes=1, on_progress=events.append)
    assert [(e.done, e.total) for e in events] == [(k, 5) for k in range(6)]
    whole = client.gradient(digits, images, objective, wrt=["input", "relu3"], cotangent=cotangent)
    for i in range(5):
        one = client.gradient(digits, images[i:i + 1], objective, wrt=["input", "relu3"],
                              cotangent=None if cotangent is None else cotangent[i:i + 1])
        for name in ("input", "relu3"):
            np.testing.assert_allclose(res.gradients[name][i:i + 1], one.gradients[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.objective[i:i + 1], one.objective, rtol=1e-5)
    np.testing.assert_allclose(res.gradient, whole.gradient, rtol=1e-5, atol=1e-6)
    if target in (None, "channel"):
        assert list(res.target_index) == list(whole.target_index)
        assert res.labels == whole.labels


def test_gradient_memory_budget_is_checked(server, client, digits, digit_images):
    from vis_service.gen import vis_pb2, vis_pb2_grpc

    # the client refuses a negative budget itself: the server is asked directly
    request = vis_pb2.GradientRequest(model="digits", memory_budget_bytes=-1,
                                      input=vis_pb2.InputBatch(images=[digit_images[0].read_bytes()]))
    code, details = raw_status(server, vis_pb2_grpc.VisServiceStub, "Gradient", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("memory_budget_bytes: must be >= 0"), details
    with pytest.raises(VisError) as e:
        client.gradient(digits, digit_images[:1], memory_budget_bytes=1 << 62)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "physical memory" in str(e.value)
    with pytest.raises(ValueError):
        client.gradient(digits, digit_images[:1], memory_budget_bytes=-1)


def test_channel_and_neuron_targets(client, digits, digit_images):
    acts = client.activations(digits, digit_images[:2], ["relu3"])["relu3"]
    ch = client.gradient(digits, digit_images[:2], Target.channel("relu3", 5), wrt=["input", "relu3"])
    np.testing.assert_allclose(ch.objective, acts[:, 5].sum(axis=(1, 2)), rtol=1e-5)
    d = ch.gradients["relu3"]
    assert np.all(d[:, 5] == 1) and np.all(d[:, [c for c in range(d.shape[1]) if c != 5]] == 0)
    ne = client.gradient(digits, digit_images[:2], Target.neuron("relu3", 5, 2, 3))
    np.testing.assert_allclose(ne.objective, acts[:, 5, 2, 3], rtol=1e-5)


def test_bad_targets(client, digits, digit_images):
    for target, code in [(99, grpc.StatusCode.INVALID_ARGUMENT),
                         (Target.channel("relu3", 64), grpc.StatusCode.INVALID_ARGUMENT),
                         (Target.neuron("relu3", 0, 8, 0), grpc.StatusCode.INVALID_ARGUMENT),
                         (Target.channel("relu33", 0), grpc.StatusCode.NOT_FOUND)]:
        with pytest.raises(VisError) as e:
            client.gradient(digits, digit_images[:1], target)
        assert e.value.code == code, e.value.details
    with pytest.raises(VisError) as e:
        client.gradient(digits, digit_images[:1], None, rule_set="lrp")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "deconvnet" in e.value.details


def test_unimplemented_op_names_op_and_node_and_forward_still_works(client):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Det", ["r"], ["y"], name="mystery")]
    g = helper.make_graph(nodes, "determinant", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 4, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])])
    model = client.load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
                              .SerializeToString())
    assert not model.gradients_supported and "Det" in model.gradients_unsupported_reason
    x = np.broadcast_to(2 * np.eye(4, dtype=np.float32), (1, 2, 4, 4)).copy()
    with pytest.raises(VisError) as e:
        client.gradient(model, x, 0)
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "Det" in e.value.details and "mystery" in e.value.details
    np.testing.assert_allclose(client.activations(model, x, ["y"])["y"], np.full((1, 2), 16.0))


@requires_shared
def test_squeezenet_top1_uses_pre_softmax_scores(client):
    res = client.gradient("squeezenet", [SHARED_IMAGES / "winml_dog_golden_retriever.jpg"], None)
    assert int(res.target_index[0]) == 207 and "golden retriever" in res.labels[0]
    assert res.result.text["objective_tensor"] != "softmaxout_1"
    assert res.objective[0] > 1.0  # a class score, not a probability
