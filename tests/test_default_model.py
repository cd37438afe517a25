"""The committed default model (vis_service/default_models/digits) loads, is accurate, and is a DAG."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")
from PIL import Image  # noqa: E402

from vis_service.default_models import DEFAULT_MODEL_DIR  # noqa: E402
from vis_service.default_models import digits_data  # noqa: E402


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def config():
    return json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def norm(config):
    return config["input"]["mean"][0], config["input"]["std"][0]


@pytest.fixture(scope="module")
def split():
    return digits_data.load_split()


@pytest.fixture(scope="module")
def model():
    return onnx.load(str(DEFAULT_MODEL_DIR / "model.onnx"))


def test_files_and_config(config):
    for name in ("model.onnx", "config.json", "labels.txt", "metrics.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    inp = config["input"]
    assert config["name"] == "digits" and config["labels"] == "labels.txt"
    assert inp["name"] == "input" and inp["layout"] == "NCHW" and inp["color"] == "GRAY"
    assert inp["size"] == [32, 32] and inp["value_range"] == [0, 1] and inp["invert"] is False
    labels = (DEFAULT_MODEL_DIR / config["labels"]).read_text().splitlines()
    assert labels == [str(i) for i in range(10)]


def test_graph_is_a_named_dag(model):
    onnx.checker.check_model(model)
    assert model.ir_version == 8
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}
    g = model.graph
    (inp,) = g.input
    (out,) = g.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 1, 32, 32]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 10]
    ops = {n.name: n.op_type for n in g.node}
    assert all(n.name for n in g.node) and len(ops) == len(g.node)
    assert ops["block1/add"] == "Add" and ops["mixed/concat"] == "Concat"
    assert ops["conv1"] == "Conv" and ops["head/gemm"] == "Gemm"
    # the residual Add joins the skip (relu1) with the block's last conv
    add = next(n for n in g.node if n.name == "block1/add")
    assert set(add.input) == {"block1/conv_b", "relu1"}
    inits = {t.name for t in g.initializer}
    for n in g.node:
        if n.op_type == "Conv":
            assert n.input[1] in inits
    assert not inits & {i.name for i in g.input}


def test_heldout_accuracy(split, norm):
    x = digits_data.to_input(split["x_test"], *norm)
    logits = _session(DEFAULT_MODEL_DIR / "model.onnx").run(["logits"], {"input": x})[0]
    assert logits.shape == (len(x), 10)
    acc = float((logits.argmax(1) == split["y_test"]).mean())
    assert acc >= 0.95, acc
    metrics = json.loads((DEFAULT_MODEL_DIR / "metrics.json").read_text())
    assert abs(acc - metrics["test_accuracy"]) < 1e-3
    assert metrics["split"]["n_test"] == len(x)


def test_split_is_stable_and_stratified(split):
    assert len(split["x_train"]) == 1347 and len(split["x_test"]) == 450
    assert not set(split["idx_train"]) & set(split["idx_test"])
    counts = np.bincount(split["y_test"], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46


def test_checkpoints_load_with_same_graph(model, split, norm):
    paths = sorted((DEFAULT_MODEL_DIR / "checkpoints").glob("step_*.onnx"))
    assert 3 <= len(paths) <= 5
    steps = [int(re.fullmatch(r"step_(\d+)\.onnx", p.name).group(1)) for p in paths]
    assert steps[0] == 0
    x = digits_data.to_input(split["x_test"][:64], *norm)
    ref = [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    for p in paths:
        m = onnx.load(str(p))
        onnx.checker.check_model(m)
        assert [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in m.graph.node] == ref
        assert _session(p).run(["logits"], {"input": x})[0].shape == (64, 10)
    # the last checkpoint is the shipped model
    assert (DEFAULT_MODEL_DIR / "model.onnx").read_bytes() == paths[-1].read_bytes()


def test_sample_pngs_classify_correctly(config):
    inp = config["input"]
    mean, std = np.float32(inp["mean"][0]), np.float32(inp["std"][0])
    paths = sorted((DEFAULT_MODEL_DIR / "samples").glob("digit_*.png"))
    assert len(paths) == 10
    sess = _session(DEFAULT_MODEL_DIR / "model.onnx")
    u8_all, y_all = digits_data.load_digits_u8()
    _, test_idx = digits_data.split_indices(y_all)
    seen = set()
    for p in paths:
        label, idx = map(int, re.fullmatch(r"digit_(\d)_(\d+)\.png", p.name).groups())
        assert idx in set(test_idx) and y_all[idx] == label
        img = Image.open(p)
        assert img.mode == "L" and img.size == (32, 32)
        v = np.asarray(img.convert("L").resize(tuple(inp["size"]), Image.BILINEAR), dtype=np.float32)
        np.testing.assert_array_equal(v, u8_all[idx])  # the PNG is exactly the training pixels
        x = ((v / np.float32(255) - mean) / std)[None, None].astype(np.float32)
        assert int(sess.run(["logits"], {"input": x})[0].argmax()) == label, p.name
        seen.add(label)
    assert seen == set(range(10))
