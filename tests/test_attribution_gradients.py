"""AttributionService: saliency, gradient x input, guided backprop and bad requests, through the real API."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from vis_client import Target
from vis_client.errors import VisError
from vis_client.gen import attribution_pb2, attribution_pb2_grpc


@pytest.fixture(scope="module")
def images(digit_images):
    return [str(p) for p in digit_images[:4]]


def test_saliency_is_max_abs_gradient_over_channels(client, digits, images):
    a = client.saliency(digits, images)
    g = client.gradient(digits, images)          # top-1 class score, like saliency's default
    np.testing.assert_array_equal(a.target_index, g.target_index)
    np.testing.assert_allclose(a.attribution, g.gradient, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.map, np.abs(g.gradient).max(axis=1), rtol=1e-5, atol=1e-7)
    assert a.map.shape == (4, 32, 32) and a.labels == [str(int(k)) for k in a.target_index]
    inputs = client.activations(digits, images, ["input"])["input"]
    np.testing.assert_array_equal(a.input, inputs)


def test_signed_saliency_and_explicit_class(client, digits, images):
    a = client.saliency(digits, images, 3, signed=True)
    g = client.gradient(digits, images, 3).gradient
    assert list(a.target_index) == [3] * 4
    # one channel (grayscale): the signed map is the gradient itself
    np.testing.assert_allclose(a.map, g[:, 0], rtol=1e-5, atol=1e-7)
    assert (a.map < 0).any() and (a.map > 0).any()


def test_gradient_x_input_is_their_product(client, digits, images):
    a = client.gradient_x_input(digits, images, [0, 1, 2, 3])
    g = client.gradient(digits, images, [0, 1, 2, 3]).gradient
    np.testing.assert_allclose(a.attribution, g * a.input, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.map, (g * a.input).sum(axis=1), rtol=1e-5, atol=1e-6)


def test_guided_backprop_equals_guided_gradient(client, digits, images):
    a = client.guided_backprop(digits, images)
    g = client.gradient(digits, images, rule_set="guided")
    np.testing.assert_allclose(a.attribution, g.gradient, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a.attribution, client.gradient(digits, images).gradient)


def test_channel_target_of_a_layer(client, digits, images):
    t = Target.channel("pool2", 5)
    a = client.saliency(digits, images, t)
    g = client.gradient(digits, images, t).gradient
    np.testing.assert_allclose(a.attribution, g, rtol=1e-5, atol=1e-7)
    assert a.labels is None


def test_render_writes_overlay_png(client, digits, images, tmp_path):
    from PIL import Image

    a = client.gradient_x_input(digits, images[:1])
    img = a.render(0, tmp_path / "gxi.png")
    assert (tmp_path / "gxi.png").is_file()
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] >= 128   # enlarged, with a colour bar
    assert Image.open(tmp_path / "gxi.png").size == (img.shape[1], img.shape[0])


def _raw_call(client, **fields):
    stub = attribution_pb2_grpc.AttributionServiceStub(client._channel)
    from vis_client.client import build_input_batch

    req = attribution_pb2.AttributionRequest(model="digits", input=build_input_batch(np.zeros((1, 1, 32, 32), np.float32)),
                                             **fields)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Attribute(req))
    return err.value


def test_bad_requests_name_the_field(client, digits):
    e = _raw_call(client, method="lime")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "method" in e.details()
    assert "saliency" in e.details() and "integrated_gradients" in e.details()
    e = _raw_call(client, method="smoothgrad", smoothgrad=attribution_pb2.SmoothGradOptions(samples=0))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "smoothgrad.samples" in e.details()
    e = _raw_call(client, method="integrated_gradients",
                  integrated_gradients=attribution_pb2.IntegratedGradientsOptions(steps=-1))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "integrated_gradients.steps" in e.details()
    # counts past the limits are refused up front, naming the allowed range (100 000 SmoothGrad samples
    # of this input would be fine: the noise is drawn run by run; one more is refused)
    e = _raw_call(client, method="smoothgrad", smoothgrad=attribution_pb2.SmoothGradOptions(samples=100_001))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "smoothgrad.samples" in e.details()
    assert "[1, 100000]" in e.details()
    e = _raw_call(client, method="integrated_gradients",
                  integrated_gradients=attribution_pb2.IntegratedGradientsOptions(steps=2000, rule="gausslegendre"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "[1, 1024] for rule gausslegendre" in e.details()
    e = _raw_call(client, method="integrated_gradients",
                  integrated_gradients=attribution_pb2.IntegratedGradientsOptions(steps=10**9))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "[1, 100000]" in e.details()
    e = _raw_call(client, method="integrated_gradients",
                  integrated_gradients=attribution_pb2.IntegratedGradientsOptions(baseline="grey"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "baseline" in e.details() and "blurred" in e.details()
    with pytest.raises(VisError) as err:
        client.integrated_gradients(digits, np.zeros((2, 1, 32, 32), np.float32), baseline_tensor=np.zeros((1, 32, 31)))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "baseline_tensor" in err.value.details
    with pytest.raises(VisError) as err:
        client.saliency(digits, np.zeros((1, 1, 32, 32), np.float32), 10)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "index" in err.value.details
    # the server keeps serving
    assert client.saliency(digits, np.zeros((1, 1, 32, 32), np.float32)).map.shape == (1, 32, 32)


def test_cli_writes_pngs_and_prints_a_line_per_image(server, digits, images, tmp_path, capsys):
    from vis_client.cli import main

    for cmd in (["saliency"], ["ig", "--steps", "8"], ["deconvnet", "--layer", "pool2", "--top-k", "4", "--crop"]):
        rc = main(["--address", server.address, cmd[0], "digits", *cmd[1:], "--images", *images[:2],
                   "--out", str(tmp_path)])
        assert rc == 0
    out = capsys.readouterr().out
    assert out.count("completeness gap") == 2 and "class 0 (0)" in out and "ch " in out
    assert len(list(tmp_path.glob("*.png"))) == 6
    assert main(["--address", server.address, "ig", "digits", "--steps", "0", "--images", images[0],
                 "--out", str(tmp_path)]) == 1


def _normalizing_net(inner: str) -> bytes:
    """(x - mean) / std inside the graph, written to a tensor named `inner`, then Conv-ReLU-pool-Gemm;
    the image input is "image_raw"."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(np.array([0.4, 0.5, 0.6], np.float32).reshape(1, 3, 1, 1), "mean"),
             numpy_helper.from_array(np.array([0.2, 0.25, 0.3], np.float32).reshape(1, 3, 1, 1), "std"),
             numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Sub", ["image_raw", "mean"], ["centred"]),
             helper.make_node("Div", ["centred", "std"], [inner], name="normalize"),
             helper.make_node("Conv", [inner, "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "normalizing", [helper.make_tensor_value_info("image_raw", TensorProto.FLOAT,
                                                                                    ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_input_means_the_image_input_where_a_tensor_inside_is_named_input(client):
    """A normalization in the graph writing to a tensor named "input": attributions are still taken
    with respect to the image input (they were taken w.r.t. that tensor: off by the std per channel)."""
    aliased = client.load_model(_normalizing_net("input"))
    plain = client.load_model(_normalizing_net("normalized"))
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    want = client.gradient(plain, x, 2).gradient
    np.testing.assert_allclose(client.gradient(aliased, x, 2).gradient, want, rtol=1e-6)
    np.testing.assert_allclose(client.saliency(aliased, x, 2).attribution, want, rtol=1e-6)
    np.testing.assert_allclose(client.gradient_x_input(aliased, x, 2).attribution, want * x, rtol=1e-6)
    ig = client.integrated_gradients(aliased, x, 2, steps=16)
    np.testing.assert_allclose(ig.attribution, client.integrated_gradients(plain, x, 2, steps=16).attribution,
                               rtol=1e-5, atol=1e-7)
    # the inner tensor stays reachable by its node's name: d/d(normalized) = d/dx * std
    inner = client.gradient(aliased, x, 2, wrt=["normalize"]).gradient
    std = np.array([0.2, 0.25, 0.3], np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(inner, want * std, rtol=1e-5)
