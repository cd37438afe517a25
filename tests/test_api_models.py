"""Model service end to end: real server, real client, real onnxruntime sessions."""
from __future__ import annotations

import hashlib
import json
import os

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import helper, numpy_helper

from conftest import assert_status, light_model_paths, requires_shared, still_serving
from vis_client import VisError
from vis_service.gen import vis_pb2
from vis_service.api.servicers import Limits
from vis_service.default_models import DEFAULT_MODEL_DIR
from vis_service.server import ServerConfig, start_server


def test_server_info_reports_provider_and_rule_sets(client):
    info = client.server_info()
    assert info["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert {"gradient", "deconvnet", "guided"} <= set(info["rule_sets"])
    if info["provider"] == "CPUExecutionProvider" and "CUDAExecutionProvider" in info["available_providers"]:
        assert info["provider_note"], "a CUDA build running on CPU must say why"


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "vis.v1.VisService", "vis.v1.ModelService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"vis.v1.VisService", "vis.v1.ModelService", "grpc.health.v1.Health"} <= names


def test_load_list_and_content_id(client):
    data = (DEFAULT_MODEL_DIR / "model.onnx").read_bytes()
    raw_hash = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    # the same bytes uploaded twice (under two names) are one model, named by their hash
    up1 = client.load_model(data, name="digits-upload")
    up2 = client.load_model(DEFAULT_MODEL_DIR / "model.onnx")
    assert up1.id == up2.id == raw_hash
    assert {"digits-upload", "model"} <= set(client.model(raw_hash).names)
    # the repository entry serves the same bytes with a config and labels: another model ...
    m = client.model("digits")
    assert m.id != raw_hash and "digits" in m.names and m.num_labels == 10 and up1.num_labels == 0
    assert m.config["input"]["color"] == "GRAY"
    # ... that shares the parsed graph and its sessions with the upload
    x = np.zeros((2, 1, 32, 32), np.float32)
    layers = ["block1/relu_a", "mixed/relu1x1", "logits"]  # a set no other test asks for
    by_repo = client.activations(m, x, layers)
    built = client.server_info()["sessions_built"]
    by_upload = client.activations(up1, x, layers[::-1])
    assert client.server_info()["sessions_built"] == built  # the twin reused the session
    np.testing.assert_array_equal(by_upload["mixed/relu1x1"], by_repo["mixed/relu1x1"])
    # uploading with the repository's config and labels gives the repository model's id
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    labels = (DEFAULT_MODEL_DIR / "labels.txt").read_text().split()
    assert client.load_model(data, config=cfg, labels=labels).id == m.id
    loaded, repo = client.list_models()
    assert "digits" in repo
    assert sum(1 for x in loaded if x.id == m.id) == 1


def test_upload_large_model_in_chunks_and_unload(client):
    # a model of ~3 MiB of weights crosses many 1 MiB upload chunks
    w = np.random.default_rng(0).standard_normal((768, 1024)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "big",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 768])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1024])],
                          [numpy_helper.from_array(w, "w")])
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    model = client.load_model(mp.SerializeToString(), name="big-matmul")
    x = np.random.default_rng(1).standard_normal((2, 768)).astype(np.float32)
    out = client.activations(model, x, ["y"])["y"]
    np.testing.assert_allclose(out, x @ w, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(client.filters(model, "fc")["weight"], w.T)  # (out, in) orientation
    assert client.unload(model)
    with pytest.raises(VisError) as e:
        client.inspect(model.id)
    assert_status(e, grpc.StatusCode.NOT_FOUND)


def test_inspect_digits(client, digits):
    ins = client.inspect(digits)
    ops = {n.op_type for n in ins.nodes}
    assert {"Conv", "Add", "Gemm"} <= ops, "the embedded model must be a DAG with a residual Add"
    proto = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    assert ins.parameter_count == sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    conv1 = next(n for n in ins.nodes if n.op_type == "Conv")
    rf = conv1.receptive_fields[conv1.outputs[0]]
    assert rf.size == (3, 3) and rf.jump == (1, 1)
    assert conv1.output_shapes[0][1:] == (conv1.output_shapes[0][1], 32, 32)
    assert "Conv" in ins.summary()


@requires_shared
@pytest.mark.parametrize("name", ["squeezenet", "mobilenet", "resnet20", "mnist"])
def test_inspect_shared_models(client, name):
    ins = client.inspect(name)
    fields = {t: rf for n in ins.nodes for t, rf in n.receptive_fields.items()}
    assert fields, "every 4-D feature tensor gets a receptive field"
    assert max(rf.size[0] for rf in fields.values()) > 10


@pytest.mark.parametrize("path", light_model_paths(), ids=lambda p: p.stem)
def test_light_graphs_upload_inspect(client, path):
    model = client.load_model(path)
    ins = client.inspect(model)
    assert len(ins.nodes) > 10 and ins.model.inputs[0].shape[0] == "N"  # batch kept symbolic
    assert any(n.receptive_fields for n in ins.nodes)
    # the weights are ConstantOfShape nodes: flagged constant, left out of the table unless asked
    built = [n for n in ins.nodes if n.op_type == "ConstantOfShape"]
    assert built and all(n.constant for n in built) and not any(n.constant for n in ins.nodes if n.op_type == "Conv")
    table, full = ins.summary(), ins.summary(constants=True)
    assert f"({sum(n.constant for n in ins.nodes)} constant nodes not shown" in table
    assert built[0].name not in table.split() and built[0].name in full.split()
    assert len(full.splitlines()) == len(table.splitlines()) - 1 + sum(n.constant for n in ins.nodes)
    client.unload(model)


# ---------------------------------------------------------------- bad input


def test_empty_upload(stubs, client):
    models, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        models.Upload(iter([vis_pb2.UploadRequest(header=vis_pb2.UploadHeader(name="empty"))]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        models.Inspect(vis_pb2.ModelRequest(model=""), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in e.value.details()
    still_serving(client)


@pytest.mark.parametrize("payload", [
    (DEFAULT_MODEL_DIR / "model.onnx").read_bytes()[:1000],        # truncated
    os.urandom(4096),                                               # random bytes
    (DEFAULT_MODEL_DIR / "labels.txt").read_bytes(),                # not ONNX at all
], ids=["truncated", "random", "text-file"])
def test_bad_model_bytes(client, payload):
    with pytest.raises(VisError) as e:
        client.load_model(payload, name="bad")
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "model")
    still_serving(client)


def test_non_onnx_image_file(client, digit_images):
    with pytest.raises(VisError) as e:
        client.load_model(digit_images[0].read_bytes())
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT)
    still_serving(client)


def _external_data_model(location: str) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.ClearField("float_data")
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "64")):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_repository_refused(client, repository, location):
    (repository.parent / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
    d = repository / f"ext{abs(hash(location)) % 10000}"
    d.mkdir(exist_ok=True)
    (d / "model.onnx").write_bytes(_external_data_model(location).SerializeToString())
    with pytest.raises(VisError) as e:
        client.model(d.name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, location)
    assert "outside" in e.value.details or "relative path" in e.value.details
    # uploaded models may not use external data at all
    with pytest.raises(VisError) as e:
        client.load_model(_external_data_model("weights.bin").SerializeToString())
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "external data")
    still_serving(client)


def test_external_data_inside_repository_loads(client, repository):
    d = repository / "ext-ok"
    d.mkdir(exist_ok=True)
    (d / "weights.bin").write_bytes((np.arange(16, dtype=np.float32)).tobytes())
    (d / "model.onnx").write_bytes(_external_data_model("weights.bin").SerializeToString())
    m = client.model("ext-ok")
    x = np.eye(4, dtype=np.float32)
    np.testing.assert_array_equal(client.activations(m, x, ["y"])["y"], np.arange(16, dtype=np.float32).reshape(4, 4))


@pytest.mark.parametrize("name", ["..", "../digits", "/etc", "a/b", "..%2f", "digits/../../x"])
def test_repository_name_traversal_refused(client, name):
    with pytest.raises(VisError) as e:
        client.model(name)
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "name", "not a valid model name")
    still_serving(client)


def test_model_over_size_limit():
    from vis_client import Client

    running = start_server(ServerConfig(port=0, model_repository=None, limits=Limits(max_upload_bytes=50_000)))
    try:
        with Client(running.address) as c:
            with pytest.raises(VisError) as e:
                c.load_model(DEFAULT_MODEL_DIR / "model.onnx")
            assert_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the limit of 50000 bytes (--max-upload-mb)")
            assert c.server_info()["max_upload_bytes"] == 50_000
    finally:
        running.stop(grace=0)


def test_unknown_model_suggests_close_names(client):
    client.model("digits")
    with pytest.raises(VisError) as e:
        client.inspect("digit")
    assert_status(e, grpc.StatusCode.NOT_FOUND, "digits")
    with pytest.raises(VisError) as e:
        client.inspect("sha256:0000000000000000")
    assert_status(e, grpc.StatusCode.NOT_FOUND)
    # a name that is not loaded goes to ModelService.Load, whose suggestions include uploaded models
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])])
    model = client.load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
                              .SerializeToString(), name="uploaded-relu")
    with pytest.raises(VisError) as e:
        client.model("uploaded-rel")
    assert_status(e, grpc.StatusCode.NOT_FOUND, "did you mean 'uploaded-relu'")
    assert client.unload(model)
    # an unknown id is close only to an id sharing its first digits: any two share 'sha256:', and an
    # unloaded upload's id was 'did you mean' another model's
    with pytest.raises(VisError) as e:
        client.unload(model.id)
    assert_status(e, grpc.StatusCode.NOT_FOUND, repr(model.id))
    assert "did you mean" not in e.value.details
    digits_id = client.model("digits").id
    with pytest.raises(VisError) as e:
        client.inspect(digits_id[:-1] + ("0" if digits_id[-1] != "0" else "1"))
    assert_status(e, grpc.StatusCode.NOT_FOUND, f"did you mean {digits_id!r}")
    still_serving(client)


def test_pbtxt_config_and_labels(client, repository, digit_images):
    """A Triton-style config.pbtxt configures preprocessing and labels like config.json does."""
    import shutil

    d = repository / "digits-pbtxt"
    d.mkdir(exist_ok=True)
    shutil.copyfile(DEFAULT_MODEL_DIR / "model.onnx", d / "model.onnx")
    (d / "names.txt").write_text("\n".join(f"digit-{k}" for k in range(10)) + "\n")
    (d / "config.pbtxt").write_text(
        'name: "digits-pbtxt"\nlabels: "names.txt"\n'
        'input { color: "GRAY" resize: "stretch" value_range: [0, 1] mean: [0.3052] std: [0.3236] }\n')
    m = client.model("digits-pbtxt")
    assert m.config["labels"] == "names.txt" and m.num_labels == 10
    res = client.gradient(m, digit_images[:3], None)
    expected = [int(p.stem.split("_")[1]) for p in digit_images[:3]]
    assert res.labels == [f"digit-{k}" for k in expected]


def test_bad_config_file_is_refused(client, repository):
    import shutil

    d = repository / "digits-badcfg"
    d.mkdir(exist_ok=True)
    shutil.copyfile(DEFAULT_MODEL_DIR / "model.onnx", d / "model.onnx")
    (d / "config.json").write_text('{"input": {"layout": "CHWN"}}')
    with pytest.raises(VisError) as e:
        client.model("digits-badcfg")
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "layout", "NCHW")
    still_serving(client)


def _recording_builder(proto, built: list):
    """build(tag): a session builder of `proto` that appends `tag` to `built` when it runs."""
    def build(tag):
        def make():
            built.append(tag)
            return proto, tag
        return make
    return build


def test_a_failed_build_leaves_no_build_lock_behind():
    """A build that raises (a request's sizes that do not fit, a model onnxruntime refuses) frees its
    per-key build lock: requests with ever new keys (a free-size model's image sizes) kept one each."""
    from vis_service.runtime.sessions import Runtime

    rt = Runtime(provider="cpu")
    proto = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")

    def failing():
        raise ValueError("no graph for this key")

    for k in range(3):
        with pytest.raises(ValueError):
            rt.session("m", ("size", k), failing)
    assert not rt._building
    built = []
    rt.session("m", ("size", 0), _recording_builder(proto, built)("ok"))   # the key builds after a failure
    assert built == ["ok"] and not rt._building


def test_a_session_whose_first_run_does_not_fit_its_input_is_not_kept():
    """A session built for a request that onnxruntime then refuses (a free channel count fed a
    number the weights do not take) leaves the cache: requests with ever new wrong sizes kept one
    each. A session that has run once stays, whatever a later request brings."""
    from vis_service.errors import InvalidArgument
    from vis_service.runtime.sessions import Runtime

    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "C", 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    rt = Runtime(provider="cpu")
    built = []
    build = _recording_builder(proto, built)
    for channels in (2, 4):
        with pytest.raises(InvalidArgument, match="channels"):
            rt.session("m", ("channels", channels), build(channels)).run(None, {"x": np.ones((1, channels, 8, 8), np.float32)})
        assert rt.sessions_cached == 0
    good = rt.session("m", ("channels", 3), build(3))
    assert good.run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0].shape == (1, 2, 6, 6)
    with pytest.raises(InvalidArgument):
        good.run(None, {"x": np.ones((1, 5, 8, 8), np.float32)})
    assert rt.sessions_cached == 1 and rt.session("m", ("channels", 3), build(3)) is good
    assert built == [2, 4, 3]


def test_session_cache_is_bounded_lru():
    from vis_service.runtime.sessions import Runtime

    rt = Runtime(provider="cpu", cache_size=2)
    proto = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    built = []
    build = _recording_builder(proto, built)

    a = rt.session("m", ("a",), build("a"))
    rt.session("m", ("b",), build("b"))
    assert rt.session("m", ("a",), build("a")) is a  # hit: nothing built
    rt.session("m", ("c",), build("c"))               # evicts the least recently used: b
    assert rt.sessions_cached == 2 and built == ["a", "b", "c"]
    rt.session("m", ("a",), build("a"))
    rt.session("m", ("b",), build("b"))
    assert built == ["a", "b", "c", "b"]
    rt.evict_model("m")
    assert rt.sessions_cached == 0


def test_session_cache_is_bounded_by_the_weights_it_holds():
    """Sessions of a large model hold ~1x (forward) to ~2x (backward graph) its weights: 32 of them
    of a 0.5 GB VGG grew past 24 GB and the kernel killed the server. The cache also bounds the
    weights it holds, and keeps each graph's structure only (onnxruntime has the weights)."""
    from vis_service.graph.weights import constant_bytes, session_bytes
    from vis_service.runtime.sessions import Runtime

    proto = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    stored = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    assert constant_bytes(proto) == stored > 100_000
    weights = session_bytes(proto)   # onnxruntime's copy and a packed one of each Conv / Gemm weight
    assert stored < weights < 2 * stored + 1
    rt = Runtime(provider="cpu", cache_size=32, cache_bytes=2 * weights + 1)
    snapshot = proto.SerializeToString()
    built = []
    build = _recording_builder(proto, built)

    a = rt.session("m", ("a",), build("a"))
    rt.session("m", ("b",), build("b"))
    assert rt.sessions_cached_bytes == 2 * weights
    rt.session("m", ("a",), build("a"))
    rt.session("m", ("c",), build("c"))               # three would exceed the bytes: b goes
    assert rt.sessions_cached == 2 and rt.sessions_cached_bytes == 2 * weights
    rt.session("m", ("b",), build("b"))
    assert built == ["a", "b", "c", "b"]
    # the builder's model is left whole; the session keeps its structure, and runs
    assert proto.SerializeToString() == snapshot
    assert all(not t.raw_data and not t.float_data for t in a.model.graph.initializer
               if np.prod(t.dims) > 4096) and [i.name for i in a.model.graph.input] == [i.name for i in proto.graph.input]
    x = np.zeros([1, 1, 32, 32], np.float32)
    assert a.run(None, {proto.graph.input[0].name: x})[0].shape[0] == 1
    # one session larger than the bound still stays (the newest always does)
    small = Runtime(provider="cpu", cache_bytes=1)
    small.session("m", ("a",), build("a"))
    small.session("m", ("b",), build("b"))
    assert small.sessions_cached == 1
    rt.evict_model("m")
    assert rt.sessions_cached == 0 and rt.sessions_cached_bytes == 0


def test_server_info_reports_the_session_cache_bytes(client):
    info = client.server_info()
    assert info["session_cache_bytes"] > 0 and 0 <= info["sessions_cached_bytes"]


def test_unload_never_loads_and_inspect_loads_under_a_work_slot(tmp_path):
    """Unload of a repository entry not loaded used to load it (seconds for a large model, on a
    thread kept for health checks) and answer True; Inspect of one loaded it without a work slot,
    past --workers. Unload now answers False without loading; Inspect that must load takes a slot."""
    import shutil
    import threading
    import time

    from vis_client import Client
    from vis_client.optimization import Objective

    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "digits")
    shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "digits2")
    running = start_server(ServerConfig(port=0, model_repository=tmp_path, workers=1))
    try:
        with Client(running.address) as c:
            built = c.server_info()["sessions_built"]
            assert c.unload("digits2") is False
            assert c.server_info()["sessions_built"] == built and not any("digits2" in m.names for m in c.list_models()[0])
            with pytest.raises(VisError) as e:
                c.unload("nothing-of-that-name")
            assert_status(e, grpc.StatusCode.NOT_FOUND, "digits2")
            digits = c.model("digits")
            cancel, started = threading.Event(), threading.Event()
            def long_call():
                with pytest.raises(VisError):   # cancelled below
                    c.maximize(digits, [Objective.channel("conv1", 0)], steps=100000, cancel=cancel,
                               on_step=lambda *_: started.set())
            worker = threading.Thread(target=long_call)
            worker.start()
            try:
                assert started.wait(60)
                assert digits.inspect().nodes   # loaded: a light call, answered while the slot is busy
                with pytest.raises(VisError) as e:
                    c.inspect("digits2")
                assert_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is busy")
            finally:
                cancel.set()
                worker.join(60)
            deadline = time.monotonic() + 30
            while True:   # the slot frees once the cancelled call has unwound
                try:
                    assert c.inspect("digits2").nodes
                    break
                except VisError as exc:
                    if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                        raise
            assert c.unload("digits2") is True
    finally:
        running.stop(grace=0)


def test_sessions_of_an_unloaded_model_are_not_cached_again():
    """Calls in flight when their model is unloaded build sessions afterwards: they were cached for
    a model no call can name (GBs for a large one, until the LRU reached them)."""
    from vis_service.runtime.sessions import Runtime

    rt = Runtime(provider="cpu")
    proto = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    build = _recording_builder(proto, [])
    rt.session("m", ("a",), build("a"))
    rt.evict_model("m")
    late = rt.session("m", ("b",), build("b"))   # a call still running builds one more
    assert rt.sessions_cached == 0 and rt.sessions_cached_bytes == 0
    assert late.run(None, {proto.graph.input[0].name: np.zeros([1, 1, 32, 32], np.float32)})[0].shape[0] == 1
    rt.revive_model("m")                          # loaded again
    rt.session("m", ("b",), build("b"))
    assert rt.sessions_cached == 1


def test_shapes_name_no_symbol_of_onnx_shape_inference(client):
    """A free-size model's inner sizes are symbols onnx shape inference makes up (unk__0): they were
    shown as names (`vis inspect`: (N, 4, unk__0, unk__1)); they are unnamed ('?'), the model's own stay."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], name="conv")]
    graph = helper.make_graph(nodes, "free", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")])
    model = client.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                                ir_version=8).SerializeToString(), name="free-size-symbols")
    try:
        inspection = client.inspect(model)
        spec = next(n for n in inspection.nodes if n.name == "conv").output_specs[0]
        assert spec.shape == ("N", 4, None, None) and spec.shape_str() == "(N, 4, ?, ?)"
        assert model.inputs[0].shape == ("N", 3, "H", "W")
    finally:
        client.unload(model.id)


def test_an_unknown_output_lists_the_outputs_and_a_channel_target_is_labelled_as_one(client):
    """Target.output(output='nope') listed 'input', 'conv1', ... (every tensor, outputs last); a saliency
    map of channel 4 was labelled 'class 4'."""
    from vis_client import Target

    x = np.zeros((1, 1, 32, 32), np.float32)
    with pytest.raises(VisError) as e:
        client.gradient("digits", x, Target.output(3, output="nope"))
    assert_status(e, grpc.StatusCode.NOT_FOUND, "output 'nope' not found; known: 'logits'")
    assert client.saliency("digits", x, Target.channel("conv3", 4)).label(0) == "channel 4"
    assert client.saliency("digits", x, 3).label(0).startswith("class 3")
