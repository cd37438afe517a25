"""Activations and filters through the real server, checked against in-process onnxruntime."""
from __future__ import annotations

import json

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import SHARED_IMAGES, SHARED_MODELS, light_model_paths, requires_shared
from vis_client import VisError
from vis_service.api.tensors import tensor_to_proto
from vis_service.gen import vis_pb2
from vis_service.default_models import DEFAULT_MODEL_DIR
from vis_service.graph.loading import prepare_model


def reference_outputs(model_path, feeds: dict, names: list[str]) -> dict[str, np.ndarray]:
    """Independent reference: expose the tensors by hand and run onnxruntime in-process."""
    m = prepare_model(onnx.load(model_path))
    vi = {v.name: v for v in list(m.graph.value_info) + list(m.graph.output)}
    del m.graph.output[:]
    m.graph.output.extend(vi[n] for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds)))


def digits_preprocess(path) -> np.ndarray:
    """The digits config, applied by hand (independent of the server's preprocessing code)."""
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["input"]
    img = Image.open(path).convert("L").resize(tuple(cfg["size"][::-1]), Image.BILINEAR)
    lo, hi = cfg["value_range"]
    x = lo + np.asarray(img, np.float32) * (hi - lo) / 255.0
    x = (x - cfg["mean"][0]) / cfg["std"][0]
    return x[None].astype(np.float32)


def digits_layers() -> list[str]:
    m = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    return [n.output[0] for n in m.graph.node if n.op_type in ("Conv", "Add", "Relu", "MaxPool", "Gemm")]


def test_activations_from_images_match_onnxruntime(client, digits, digit_images):
    layers = digits_layers()[:6] + ["logits"]
    acts = client.activations(digits, digit_images, layers)
    assert list(acts) == layers
    x = np.stack([digits_preprocess(p) for p in digit_images])
    ref = reference_outputs(DEFAULT_MODEL_DIR / "model.onnx", {"input": x}, layers)
    for name in layers:
        assert acts[name].shape == ref[name].shape
        np.testing.assert_allclose(acts[name], ref[name], rtol=1e-4, atol=1e-4, err_msg=name)
    labels = [int(p.stem.split("_")[1]) for p in digit_images]
    assert list(acts["logits"].argmax(1)) == labels


def test_node_names_resolve_and_sessions_are_cached(client, digits):
    m = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    node = next(n for n in m.graph.node if n.op_type == "Add" and n.name)
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    a = client.activations(digits, x, [node.name, "logits"])
    built = client.server_info()["sessions_built"]
    b = client.activations(digits, x, ["logits", node.name])  # same set, other order
    c = client.activations(digits, x, [node.output[0], "logits"])  # tensor name of the same node
    assert client.server_info()["sessions_built"] == built, "a repeated request must not build a session"
    np.testing.assert_array_equal(a[node.name], b[node.name])
    np.testing.assert_array_equal(a[node.name], c[node.output[0]])


def test_large_tensor_is_chunked_and_reassembled(client, digits, server):
    first = digits_layers()[0]
    x = np.random.default_rng(1).standard_normal((64, 1, 32, 32)).astype(np.float32)
    out = client.activations(digits, x, [first])[first]
    assert out.nbytes > 4 * server.state.limits.chunk_bytes  # crosses several chunks
    ref = reference_outputs(DEFAULT_MODEL_DIR / "model.onnx", {"input": x}, [first])[first]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_unknown_layer_lists_close_matches(client, digits):
    first = digits_layers()[0]
    with pytest.raises(VisError) as e:
        client.activations(digits, np.zeros((1, 1, 32, 32), np.float32), [first + "x"])
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert first in e.value.details


@pytest.mark.parametrize("x, fragment", [
    (np.zeros((1, 1, 28, 28), np.float32), "shape"),
    (np.zeros((1, 3, 32, 32), np.float32), "shape"),
    (np.zeros((1, 1, 32, 32), np.float64), "dtype"),
    (np.zeros((1, 1, 32, 32), np.int64), "dtype"),
    (np.full((1, 1, 32, 32), np.nan, np.float32), "NaN"),
    (np.full((2, 1, 32, 32), np.inf, np.float32), "Inf"),
    (np.where(np.arange(2 * 32 * 32).reshape(2, 1, 32, 32) == 1500, np.nan, 1).astype(np.float32), "NaN"),
    (np.where(np.arange(2 * 32 * 32).reshape(2, 1, 32, 32) == 7, -np.inf, 1e20).astype(np.float32), "Inf"),
], ids=["spatial", "channels", "float64", "int64", "nan", "inf", "one-nan", "one-inf-among-large"])
def test_bad_input_tensors(stubs, client, digits, x, fragment):
    # raw stub: the Python client would cast float64 itself
    _, vis = stubs
    req = vis_pb2.ActivationsRequest(model=digits.id, layers=["logits"],
                                     input=vis_pb2.InputBatch(tensors=[tensor_to_proto("", x)]))
    with pytest.raises(grpc.RpcError) as e:
        list(vis.Activations(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.details() and "input.tensors[input]" in e.value.details()
    assert client.activations(digits, np.zeros((1, 1, 32, 32), np.float32), ["logits"])["logits"].shape == (1, 10)


def test_large_finite_input_is_accepted(client, digits):
    # the finiteness check's fast path (a sum of squares) overflows here; the values are still valid
    x = np.full((2, 1, 32, 32), 3e38, np.float32)
    x[1] = -1e25
    assert client.activations(digits, x, ["logits"])["logits"].shape == (2, 10)


def test_undecodable_image(stubs, client, digits):
    with pytest.raises(VisError) as e:
        client.activations(digits, [b"\x89PNG\r\n\x1a\n garbage"], ["logits"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input.images[0]" in e.value.details and "decode" in e.value.details
    assert "BytesIO" not in e.value.details and "PNG or JPEG" in e.value.details
    _, vis = stubs
    req = vis_pb2.ActivationsRequest(model=digits.id, layers=["logits"], input=vis_pb2.InputBatch(
        images=[digits_png()], preprocess=vis_pb2.Preprocessing(preset="nonsense")))
    with pytest.raises(grpc.RpcError) as e:
        list(vis.Activations(req, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input.preprocess.preset" in e.value.details()


def digits_png() -> bytes:
    return sorted((DEFAULT_MODEL_DIR / "samples").glob("*.png"))[0].read_bytes()


@requires_shared
def test_squeezenet_images_with_caffe_config(client):
    """The repository config (caffe preset: BGR, mean-subtracted) gives the expected classes."""
    model = client.model("squeezenet")
    imgs = [SHARED_IMAGES / "skimage_chelsea_cat.png", SHARED_IMAGES / "winml_dog_golden_retriever.jpg",
            SHARED_IMAGES / "wonnx_bald_eagle.jpg", SHARED_IMAGES / "skimage_coffee.png"]
    out = client.activations(model, imgs, ["softmaxout_1", "fire9/concat_1"])
    top = out["softmaxout_1"].reshape(4, -1).argmax(1)
    assert 281 <= top[0] <= 285 and list(top[1:]) == [207, 22, 967]
    assert out["fire9/concat_1"].shape == (4, 512, 13, 13)


@requires_shared
def test_mobilenet_top1_label_through_gradient_call(client):
    """Responses about classes carry label names (1001 classes, index 0 = background)."""
    res = client.gradient("mobilenet", [SHARED_IMAGES / "coral_parrot.jpg"], None)
    assert "macaw" in res.labels[0]
    assert res.gradient.shape == (1, 3, 192, 192)


@pytest.mark.parametrize("path", [p for p in light_model_paths()
                                  if p.stem in ("light_resnet50", "light_densenet121", "light_inception_v1",
                                                "light_squeezenet", "light_shufflenet")], ids=lambda p: p.stem)
def test_dag_activations_match_full_exposure(client, path):
    model = client.load_model(path)
    m = prepare_model(onnx.load(path))
    tensors = [n.output[0] for n in m.graph.node if n.op_type in ("Concat", "Sum", "Add", "Relu")]
    pick = [tensors[len(tensors) // 4], tensors[len(tensors) // 2], tensors[-1]]
    x = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
    got = client.activations(model, x, pick)
    ref = reference_outputs(path, {m.graph.input[0].name: x}, pick)
    for t in pick:
        np.testing.assert_allclose(got[t], ref[t], rtol=1e-3, atol=1e-4, err_msg=t)
    client.unload(model)


# ---------------------------------------------------------------- filters


def test_filters_from_initializers(client, digits):
    m = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    f = client.filters(digits, conv.name)
    np.testing.assert_array_equal(f["weight"], inits[conv.input[1]])
    np.testing.assert_array_equal(f["bias"], inits[conv.input[2]])
    g = client.filters(digits, conv.output[0])  # by output tensor too
    np.testing.assert_array_equal(g["weight"], f["weight"])


def test_filters_of_constant_subgraph_weights(client):
    """light_* graphs compute weights with ConstantOfShape instead of storing them."""
    path = next(p for p in light_model_paths() if p.stem == "light_bvlc_alexnet")
    model = client.load_model(path)
    m = onnx.load(path)
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    f = client.filters(model, conv.name or conv.output[0])
    assert f["weight"].shape == (96, 3, 11, 11)
    producer = {o: n for n in m.graph.node for o in n.output}[conv.input[1]]
    assert producer.op_type == "ConstantOfShape"
    value = onnx.numpy_helper.to_array(producer.attribute[0].t).reshape(-1)[0] if producer.attribute else 0.0
    assert np.all(f["weight"] == value)


def test_filters_of_layer_without_weights(client, digits):
    m = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    with pytest.raises(VisError) as e:
        client.filters(digits, relu.name or relu.output[0])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "Relu" in e.value.details
    with pytest.raises(VisError) as e:
        client.filters(digits, "no-such-layer")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_old_dropout_masks_can_be_exposed(client):
    """ONNX inference leaves an opset-7..9 Dropout's mask untyped: it is exposed with the data's type,
    as onnxruntime computes it for the original model (it was refused as 'no inferred type')."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from _graph_helpers import LIGHT_DIR

    path = LIGHT_DIR / "light_bvlc_alexnet.onnx"
    model = onnx.load(str(path))
    masks = [n.output[1] for n in model.graph.node if n.op_type == "Dropout" and len(n.output) > 1]
    assert masks
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    got = client.activations(client.load_model(path), x, masks)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in masks)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(reference.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(masks, {model.graph.input[0].name: x})
    for name, w in zip(masks, want):
        assert got[name].dtype == w.dtype and got[name].shape == w.shape
        np.testing.assert_array_equal(got[name], w)
