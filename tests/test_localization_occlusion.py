"""LocalizationService.Occlusion against a brute-force loop: one occluded image per call,
built in numpy, classified with client.activations."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from vis_client import Cancelled, InvalidArgument, NotFound, ResourceExhausted
from vis_service.default_models import DEFAULT_MODEL_DIR

from test_localization_cam import CLASSES, tiny_model_bytes


def _probabilities(z):
    """Softmax of class scores; an output that already is a probability vector is kept."""
    z = z.reshape(z.shape[0], -1).astype(np.float64)
    if z.min() >= 0 and np.allclose(z.sum(axis=1), 1, atol=1e-5):
        return z
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def small(client):
    """(model, scores tensor, feature layer, images): the digits model when it is built, else the tiny CNN."""
    if (DEFAULT_MODEL_DIR / "model.onnx").is_file():
        m = client.model("digits")
        images = sorted((DEFAULT_MODEL_DIR / "samples").glob("digit_*.png"))[:2]
        if images:
            return m, client.activations(m, images, [m.inputs[0].name])[m.inputs[0].name]
        shape = [2] + [d if isinstance(d, int) else 1 for d in m.inputs[0].shape[1:]]
        return m, np.random.default_rng(3).normal(size=shape).astype(np.float32)
    m = client.load_model(tiny_model_bytes(), "loc_tiny", config={"preset": "raw255"}, labels=CLASSES)
    return m, np.random.default_rng(3).uniform(0, 255, (2, 3, 16, 16)).astype(np.float32)


def _grey(model, channels):
    cfg = model.config
    presets = {"raw255": (0.0, 255.0), "imagenet": (0.0, 1.0), "caffe": (0.0, 255.0), "tf": (-1.0, 1.0)}
    inp = cfg.get("input", {})
    lo, hi = inp.get("value_range") or presets.get(cfg.get("preset", ""), (0.0, 1.0))
    mean = np.asarray(inp.get("mean") or [0.0], dtype=np.float64)
    std = np.asarray(inp.get("std") or [1.0], dtype=np.float64)
    return np.broadcast_to((lo + (hi - lo) * 127.5 / 255 - mean) / std, (channels,))


@pytest.mark.parametrize("fill", ["grey", "zero", "mean"])
def test_occlusion_equals_brute_force(client, small, fill, every_cut):
    model, x = small
    n, c, h, w = x.shape
    patch, stride = (h // 3, w // 4), (h // 4, w // 5)
    occ = client.occlusion(model, x, patch=patch, stride=stride, fill=fill, batch=7)
    layer = occ.layer
    if (DEFAULT_MODEL_DIR / "model.onnx").is_file():
        # the digits model's residual block output is a local cut (graph.local_head): each patch
        # recomputes it from a crop of the cut before and replays the rest, and must still match
        # the loop below
        recomputed = occ.result.text["recomputed"]
        assert "block1/add from " in recomputed and "crops of block1/add" in recomputed, recomputed
    scores_name = model.outputs[0].name
    base = client.activations(model, x, [scores_name, layer])
    target = base[scores_name].argmax(axis=1)
    np.testing.assert_array_equal(occ.target_index, target)
    strongest = base[layer].reshape(n, base[layer].shape[1], -1).sum(axis=2).argmax(axis=1)
    np.testing.assert_array_equal(occ.feature_channel, strongest)
    rows, cols = (h - patch[0]) // stride[0] + 1, (w - patch[1]) // stride[1] + 1
    assert occ.probability.shape == (n, rows, cols) and occ.patch == patch and occ.stride == stride
    for i in range(n):
        value = {"grey": _grey(model, c), "zero": np.zeros(c), "mean": x[i].mean(axis=(1, 2))}[fill]
        for r in range(rows):
            for q in range(cols):
                img = x[i:i + 1].copy()
                img[0, :, r * stride[0]:r * stride[0] + patch[0], q * stride[1]:q * stride[1] + patch[1]] = value[:, None, None]
                out = client.activations(model, img, [scores_name, layer])
                p = _probabilities(out[scores_name])[0]
                assert occ.probability[i, r, q] == pytest.approx(p[target[i]], rel=1e-4, abs=1e-6)
                assert occ.top_class[i, r, q] == p.argmax()
                total = out[layer][0, strongest[i]].astype(np.float64).sum()
                assert occ.feature[i, r, q] == pytest.approx(total, rel=1e-4, abs=1e-4)
    p0 = _probabilities(base[scores_name])[np.arange(n), target]
    np.testing.assert_allclose(occ.probability_unoccluded, p0, rtol=1e-5)
    if occ.top_class_labels is not None:  # label names follow the class map entry by entry
        names = dict(zip(occ.target_index.tolist(), occ.labels))
        for k, name in zip(occ.top_class.reshape(-1), np.asarray(occ.top_class_labels, dtype=object).reshape(-1)):
            assert names.get(int(k), name) == name


@pytest.mark.parametrize("nhwc", [False, True])
def test_occlusion_through_a_chain_of_cuts_equals_brute_force(client, nhwc, every_cut):
    """A net with asymmetric pads, BatchNorm, a ceil-mode pool, a residual block and a Concat
    with an average pool: the first conv's output is recomputed from image crops, the block
    output from crops of that, and the maps equal classifying every occluded image whole.
    NHWC: the input transposed to NCHW first (tf2onnx); the crops go to the head transposed."""
    from test_graph_local_head import H, W, _net

    proto = _net(H, W, nhwc=nhwc)
    model = client.load_model(proto.SerializeToString(), f"local_chain_{'nhwc' if nhwc else 'nchw'}")
    shape = (2, H, W, 3) if nhwc else (2, 3, H, W)
    x = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    patch, stride = (12, 12), (9, 9)
    occ = client.occlusion(model, x, patch=patch, stride=stride, fill="zero", batch=16)
    first, second = ("conv_3", "add_16") if nhwc else ("conv_2", "add_15")
    recomputed = occ.result.text["recomputed"]
    assert recomputed.startswith(f"{first} from ") and f"{second} from " in recomputed, recomputed
    assert f"crops of {first}" in recomputed and ("crops of transpose_1" in recomputed) == nhwc
    scores = model.outputs[0].name
    rows, cols = (H - patch[0]) // stride[0] + 1, (W - patch[1]) // stride[1] + 1
    for i in range(len(x)):
        images = np.repeat(x[i:i + 1], rows * cols, axis=0)
        for k in range(rows * cols):
            r, q = divmod(k, cols)
            window = (slice(r * stride[0], r * stride[0] + patch[0]), slice(q * stride[1], q * stride[1] + patch[1]))
            images[(k, ...) + window + (slice(None),) if nhwc else (k, slice(None)) + window] = 0
        out = client.activations(model, images, [scores, occ.layer])
        p = _probabilities(out[scores])
        np.testing.assert_allclose(occ.probability[i].ravel(), p[:, occ.target_index[i]], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(occ.top_class[i].ravel(), p.argmax(axis=1))
        totals = out[occ.layer][:, occ.feature_channel[i]].reshape(rows * cols, -1).astype(np.float64).sum(axis=1)
        np.testing.assert_allclose(occ.feature[i].ravel(), totals, rtol=1e-4, atol=1e-4)


def test_failed_planning_falls_back_to_the_whole_network(client, monkeypatch, every_cut):
    from test_graph_local_head import H, W, _net

    import vis_service.methods.occlusion as occlusion

    proto = _net(H, W)
    x = np.random.default_rng(6).normal(size=(1, 3, H, W)).astype(np.float32)
    kw = dict(patch=(16, 16), stride=(8, 8), fill="zero", batch=32)
    through_cuts = client.occlusion(client.load_model(proto.SerializeToString(), "local_planned"), x, **kw)

    def broken(*args, **kwargs):
        raise RuntimeError("no plan")

    monkeypatch.setattr(occlusion, "plan_local_cuts", broken)
    proto.producer_name = "another id"  # a model whose plan is not memoized yet
    whole = client.occlusion(client.load_model(proto.SerializeToString(), "local_unplanned"), x, **kw)
    assert whole.result.text["recomputed"] == "the whole network per patch"
    assert "crops" in through_cuts.result.text["recomputed"]
    np.testing.assert_allclose(whole.probability, through_cuts.probability, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(whole.feature, through_cuts.feature, rtol=1e-5)
    np.testing.assert_array_equal(whole.top_class, through_cuts.top_class)


@pytest.mark.parametrize("model_id", ["shared:squeezenet1.0", "shared:mobilenet_v1", "light:inception_v1"])
def test_cuts_on_real_graphs_give_the_whole_network_maps(client, monkeypatch, model_id, every_cut):
    """Fire modules (Concat), ReLU6 as Clip with depthwise convs, LRN and Inception's branches:
    the maps through the planned cuts equal those of the whole network per patch."""
    from _graph_helpers import load

    import vis_service.methods.occlusion as occlusion

    proto = load(model_id)  # skips where ../shared is missing
    dims = [2] + [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(7).uniform(-1, 1, dims).astype(np.float32)
    kw = dict(patch=64, stride=48, fill="zero", batch=16)
    name = model_id.replace(":", "_")
    cut = client.occlusion(client.load_model(proto.SerializeToString(), name + "_cut"), x, **kw)
    assert " crops of " in cut.result.text["recomputed"]
    monkeypatch.setattr(occlusion, "plan_local_cuts", lambda *args, **kwargs: [])
    proto.producer_name = "whole network"
    whole = client.occlusion(client.load_model(proto.SerializeToString(), name + "_whole"), x, **kw)
    assert whole.result.text["recomputed"] == "the whole network per patch"
    np.testing.assert_allclose(cut.probability, whole.probability, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cut.feature, whole.feature, rtol=1e-4, atol=1e-4 * np.abs(whole.feature).max())
    np.testing.assert_array_equal(cut.top_class, whole.top_class)


def test_defaults_and_render(client, small, tmp_path):
    pytest.importorskip("matplotlib")
    model, x = small
    occ = client.occlusion(model, x[:1])
    side = min(x.shape[2:]) // 4
    assert occ.patch == (side, side) and occ.stride == (side // 2, side // 2) and occ.fill == "grey"
    paths = occ.render(0, tmp_path)
    assert all(p.is_file() for p in paths.values()) and set(paths) == {"probability", "feature", "top_class"}
    # a file name, as the other results' render takes: its stem (it made a directory 'occ.png')
    named = occ.render(0, tmp_path / "sub" / "occ.png")
    assert named["probability"] == tmp_path / "sub" / "occ_probability.png" and named["probability"].is_file()


def test_progress_and_cancel(client, small):
    model, x = small
    seen = []
    occ = client.occlusion(model, x, patch=4, stride=4, batch=8, on_progress=seen.append)
    total = occ.probability.size
    assert [p.done for p in seen][-1] == total and all(p.total == total for p in seen)
    assert len(seen) >= total // 8  # batched: one report per run of 8

    cancel = threading.Event()
    reports = []

    def on_progress(p):
        reports.append(p)
        cancel.set()

    with pytest.raises(Cancelled):
        client.occlusion(model, x, patch=1, stride=1, batch=1, on_progress=on_progress, cancel=cancel)
    assert reports
    assert client.occlusion(model, x[:1], patch=8, stride=8).probability.shape[0] == 1  # still serving


def test_bad_requests(client, small):
    model, x = small
    with pytest.raises(InvalidArgument) as e:
        client.occlusion(model, x, fill="pink")
    assert "fill" in e.value.details and "grey" in e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.occlusion(model, x, patch=x.shape[2] + 1)
    assert "patch" in e.value.details and "larger" in e.value.details
    with pytest.raises(InvalidArgument) as e:
        client.occlusion(model, x, stride=[0, 2])
    assert "stride" in e.value.details
    with pytest.raises(NotFound):
        client.occlusion(model, x, layer="no_such_layer")
    with pytest.raises(ResourceExhausted) as e:  # a server limit, not a malformed request
        client.occlusion(model, x, batch=10 ** 6)
    assert "batch" in e.value.details and "limit of 256" in e.value.details
    assert client.occlusion(model, x[:1], patch=8).probability.ndim == 3


def test_a_free_size_model_recomputes_patches_through_the_same_local_cuts(client, digits, every_cut):
    """The digits model exported with a free height and width: its cuts are planned on the graph at
    the images' size (it ran the whole network per patch), and its maps equal the fixed model's."""
    import json

    import onnx

    proto = onnx.load(str(DEFAULT_MODEL_DIR / "model.onnx"))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    for vi in list(proto.graph.output) + list(proto.graph.value_info):
        vi.type.tensor_type.ClearField("shape")
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    config.pop("labels", None)
    config.pop("name", None)
    config["input"].pop("size")   # the free model's images come as tensors of their size
    free = client.load_model(proto.SerializeToString(), "digits_free_size", config=config)
    x = np.random.default_rng(4).uniform(0, 1, (2, 1, 32, 32)).astype(np.float32)
    a, b = (client.occlusion(m, x, patch=(10, 8), stride=(8, 6)) for m in (free, digits))
    assert "block1/add from " in a.result.text["recomputed"], a.result.text["recomputed"]
    assert a.result.text["recomputed"] == b.result.text["recomputed"]
    np.testing.assert_allclose(a.probability, b.probability, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.feature, b.feature, rtol=1e-5, atol=1e-5)
