"""AttributionService.Deconvnet: graph projections == the numpy deconvnet, unit selection, crops, errors."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import SHARED_IMAGES, requires_shared
from vis_client import Target
from vis_client.errors import VisError
from vis_service.engine.deconvnet_numpy import deconvnet_projection


def _numpy_projections(server, model, d, input_name):
    """The numpy deconvnet of every selected unit, one one-hot cotangent per stacked copy."""
    proto = server.state.store.get(model.id).proto
    n, k = d.channels.shape
    x = np.repeat(d.input, k, axis=0)
    act = model.activations(d.input, [d.layer])[d.layer]
    cot = np.zeros((n * k,) + act.shape[1:], act.dtype)
    rows = np.arange(n * k)
    cot[rows, d.channels.ravel(), d.positions[..., 0].ravel(), d.positions[..., 1].ravel()] = 1
    return deconvnet_projection(proto, {input_name: x}, d.layer, cot).reshape(d.projections.shape), act


def _check_against_numpy(server, model, d, input_name):
    ref, act = _numpy_projections(server, model, d, input_name)
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.abs(d.projections - ref).max() <= 1e-5 * scale
    # the selection: k strongest channels by their max activation, each at its argmax
    n, k = d.channels.shape
    for i in range(n):
        strength = act[i].reshape(act.shape[1], -1).max(axis=1)
        np.testing.assert_array_equal(d.channels[i], np.argsort(-strength, kind="stable")[:k])
        for j in range(k):
            c, (y, x) = d.channels[i, j], d.positions[i, j]
            assert act[i, c, y, x] == strength[c] == d.activations[i, j]


def test_digits_projections_match_numpy_and_crops_match_receptive_field(client, server, digits, digit_images):
    images = [str(p) for p in digit_images[:3]]
    d = client.deconvnet(digits, images, "pool2", top_k=4, crop=True)
    assert d.projections.shape == (3, 4, 1, 32, 32) and d.text["rule_set"] == "deconvnet"
    _check_against_numpy(server, digits, d, "input")
    rf = client.inspect(digits).node("pool2").receptive_fields["pool2"]
    assert d.crops.shape[-2:] == rf.size
    for i in range(3):
        for j in range(4):
            top, left, bottom, right = d.boxes[i, j]
            y, x = d.positions[i, j]
            # the box is centred on the unit's field (offset + position * jump), clipped to the image
            cy, cx = rf.offset[0] + y * rf.jump[0], rf.offset[1] + x * rf.jump[1]
            assert top == max(0, int(np.floor(cy - (rf.size[0] - 1) / 2))) and bottom <= 32
            assert left == max(0, int(np.floor(cx - (rf.size[1] - 1) / 2))) and right <= 32
            proj = d.projections[i, j]
            # everything outside the receptive field is zero; the crop holds what is inside
            inside = np.zeros(proj.shape, bool)
            inside[:, top:bottom, left:right] = True
            assert not proj[~inside].any()
            assert np.isclose(np.abs(d.crops[i, j]).sum(), np.abs(proj).sum(), rtol=1e-5)
    # rendered: small crops enlarged to tiles of >= 128 pixels (at most 8x), 2x2 grid of 4
    k = min(8, -(-128 // min(rf.size)))
    grid = d.render_grid(0)
    assert grid.shape[0] >= 2 * rf.size[0] * k and grid.shape[1] >= 2 * rf.size[1] * k
    assert d.render_grid(0, crops=False).shape[0] >= 2 * 32 * 4   # 32-pixel projections: 4x


def test_channel_and_neuron_targets(client, digits, digit_images):
    images = [str(p) for p in digit_images[:2]]
    top = client.deconvnet(digits, images, "pool2", top_k=3)
    ch = int(top.channels[0, 1])
    one = client.deconvnet(digits, images, "pool2", target=ch)
    assert one.channels.shape == (2, 1) and (one.channels == ch).all()
    np.testing.assert_allclose(one.projections[0, 0], top.projections[0, 1], rtol=1e-5, atol=1e-7)
    y, x = (int(v) for v in top.positions[0, 1])
    neuron = client.deconvnet(digits, images, "pool2", target=Target.neuron("pool2", ch, y, x))
    np.testing.assert_allclose(neuron.projections[0, 0], top.projections[0, 1], rtol=1e-5, atol=1e-7)
    guided = client.deconvnet(digits, images, "pool2", target=ch, rule_set="guided")
    g = client.gradient(digits, images, Target.neuron("pool2", ch, y, x), rule_set="guided").gradient
    np.testing.assert_allclose(guided.projections[0, 0], g[0], rtol=1e-5, atol=1e-7)


@requires_shared
@pytest.mark.parametrize("name,layer,input_name", [("resnet20", "/layer2/layer2.0/Relu_1_output_0", "input"),
                                                   ("squeezenet", "pool3_1", "data_0")])
def test_trained_models_match_numpy(client, server, name, layer, input_name):
    model = client.model(name)
    d = client.deconvnet(model, [str(SHARED_IMAGES / "skimage_chelsea_cat.png")], layer, top_k=2, crop=True)
    _check_against_numpy(server, model, d, input_name)
    rf = client.inspect(model).node(layer).receptive_fields[layer]
    if not rf.global_:
        assert d.crops.shape[-2:] == rf.size


def test_bad_deconvnet_requests(client, digits):
    x = np.zeros((1, 1, 32, 32), np.float32)
    with pytest.raises(VisError) as err:
        client.deconvnet(digits, x, "pool22")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "pool2" in err.value.details
    with pytest.raises(VisError) as err:
        client.deconvnet(digits, x, "flatten")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "4-D" in err.value.details
    with pytest.raises(VisError) as err:
        client.deconvnet(digits, x, "pool2", target=1000)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "channel" in err.value.details
    with pytest.raises(VisError) as err:
        client.deconvnet(digits, x, "pool2", rule_set="lrp")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "rule" in err.value.details
    assert client.deconvnet(digits, x, "pool2", top_k=1).projections.shape == (1, 1, 1, 32, 32)


def test_nhwc_model_projections_and_crops_share_the_input_layout(client):
    """An NHWC model (a Transpose after its input): projections and crops both come channels-last,
    and each crop is its projection cut to the unit's box (crops came channels-first)."""
    from _graph_helpers import Net

    net = Net(c=3, h=16, w=16, seed=2, nhwc=True)
    net.conv(cout=8, pads=(1, 1, 1, 1))
    net.relu()
    net.pool()
    net.conv(cout=8, pads=(1, 1, 1, 1))
    layer = net.relu()
    m = client.load_model(net.model().SerializeToString())
    x = np.random.default_rng(1).random((2, 16, 16, 3), dtype=np.float32)
    d = client.deconvnet(m, x, layer, top_k=3, crop=True)
    assert d.projections.shape == (2, 3, 16, 16, 3)
    assert d.crops.shape[:2] == (2, 3) and d.crops.shape[-1] == 3
    inside = 0
    for i in range(2):
        for j in range(3):
            top, left, bottom, right = (int(v) for v in d.boxes[i, j])
            h, w = bottom - top, right - left
            if h == d.crops.shape[2] and w == d.crops.shape[3]:   # a box inside the image: the crop is exact
                np.testing.assert_array_equal(d.crops[i, j], d.projections[i, j, top:bottom, left:right, :])
                inside += 1
    assert inside
