"""Requests an exploratory fuzzing session found answered INTERNAL, accepted silently, or that
starved the server: each now gets a clear status, and the server keeps serving."""
from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import assert_status, raw_status, still_serving
from vis_client import Client, Objective, Target
from vis_client.errors import VisError
from vis_service.api.servicers import Limits
from vis_service.default_models import DEFAULT_REPOSITORY
from vis_service.gen import vis_pb2
from vis_service.server import ServerConfig, start_server


def _identity_model(input_type, shape=(None, 1, 4, 4)) -> bytes:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_value_info("x", input_type)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_sequence_input_is_refused_and_list_keeps_working(client):
    sequence = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4]))
    with pytest.raises(VisError) as e:
        client.load_model(_identity_model(sequence), name="sequence-model")
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "input 'x' is a sequence, not a tensor")
    loaded, _ = client.list_models()
    assert "sequence-model" not in {n for m in loaded for n in m.names}
    still_serving(client)


def test_a_zero_sized_input_dimension_is_refused(client):
    with pytest.raises(VisError) as e:
        client.load_model(_identity_model(helper.make_tensor_type_proto(TensorProto.FLOAT, ["N", 1, 0, 4])))
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "input 'x' has shape ['N', 1, 0, 4]",
                  "static dimensions must be >= 1")


def test_names_are_matched_whole(client, digits):
    data = _identity_model(helper.make_tensor_type_proto(TensorProto.FLOAT, ["N", 1, 4, 4]))
    with pytest.raises(VisError) as e:
        client.load_model(data, name="digits\n")   # `$` in a regex admits a trailing newline
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "is not a valid model name")


def test_an_upload_config_naming_a_labels_file_needs_the_labels(stubs):
    models, _ = stubs
    data = _identity_model(helper.make_tensor_type_proto(TensorProto.FLOAT, ["N", 1, 4, 4]))
    for config_labels, labels in (("../../../etc/passwd", ["a"]), ("labels.txt", [])):
        header = vis_pb2.UploadHeader(config=vis_pb2.ModelConfig(labels=config_labels), labels=labels)
        with pytest.raises(grpc.RpcError) as e:
            models.Upload(iter([vis_pb2.UploadRequest(header=header), vis_pb2.UploadRequest(chunk=data)]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "header.config.labels" in e.value.details() and "header.labels" in e.value.details()


def test_a_repository_config_json_must_be_an_object(tmp_path):
    entry = tmp_path / "m"
    entry.mkdir()
    (entry / "model.onnx").write_bytes(_identity_model(helper.make_tensor_type_proto(TensorProto.FLOAT,
                                                                                     ["N", 1, 4, 4])))
    (entry / "config.json").write_text("[]")
    running = start_server(ServerConfig(port=0, model_repository=tmp_path))
    try:
        with Client(running.address) as c:
            with pytest.raises(VisError) as e:
                c.model("m").inspect()
            assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "config (config.json)", "one JSON object")
    finally:
        running.stop(grace=0)


@pytest.mark.parametrize("config,field", [
    (vis_pb2.InputConfig(value_range=[0, float("nan")]), "input.preprocess.config.value_range"),
    (vis_pb2.InputConfig(mean=[float("inf")]), "input.preprocess.config.mean"),
    (vis_pb2.InputConfig(std=[1e-30]), "input.preprocess.config.std"),
    (vis_pb2.InputConfig(name="nope"), "input.preprocess.config.name"),
])
def test_preprocessing_numbers_and_names_are_checked(stubs, digits, digit_images, config, field):
    _, vis = stubs
    request = vis_pb2.ActivationsRequest(model="digits", layers=["conv1"], input=vis_pb2.InputBatch(
        images=[digit_images[0].read_bytes()], preprocess=vis_pb2.Preprocessing(config=config)))
    with pytest.raises(grpc.RpcError) as e:
        list(vis.Activations(request))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()


def test_an_upload_config_with_a_nan_value_range_is_refused(stubs):
    models, _ = stubs
    data = _identity_model(helper.make_tensor_type_proto(TensorProto.FLOAT, ["N", 1, 4, 4]))
    config = vis_pb2.ModelConfig(input=vis_pb2.InputConfig(value_range=[0, float("nan")]))
    with pytest.raises(grpc.RpcError) as e:
        models.Upload(iter([vis_pb2.UploadRequest(header=vis_pb2.UploadHeader(config=config)),
                            vis_pb2.UploadRequest(chunk=data)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("header.config.input.value_range: values must be finite")


def test_an_image_twice_is_refused(stubs, digits):
    _, vis = stubs
    x = np.zeros((1, 1, 32, 32), np.float32)
    tensors = [vis_pb2.Tensor(name=n, datatype="FP32", shape=x.shape, raw_contents=x.tobytes()) for n in ("", "input")]
    with pytest.raises(grpc.RpcError) as e:
        list(vis.Activations(vis_pb2.ActivationsRequest(model="digits", layers=["conv1"],
                                                        input=vis_pb2.InputBatch(tensors=tensors))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "given twice" in e.value.details()


def test_a_tensor_of_more_dimensions_than_numpy_holds_is_refused(stubs, digits):
    """65 dimensions (numpy's limit is 64) were INTERNAL 'ValueError: maximum supported dimension'
    (the request fuzzing sweep)."""
    _, vis = stubs
    t = vis_pb2.Tensor(name="input", datatype="FP32", shape=[1] * 65, raw_contents=b"\0" * 4)
    with pytest.raises(grpc.RpcError) as e:
        list(vis.Activations(vis_pb2.ActivationsRequest(model="digits", input=vis_pb2.InputBatch(tensors=[t]))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "input.tensors[0].shape: 65 dimensions; at most 32"


def test_a_model_onnxruntime_refuses_is_told_in_its_words_without_source_locations(client):
    """An opset onnxruntime does not know: its status prefix and the C++ file, line and function
    signature came along in the details."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 99)], ir_version=8)
    with pytest.raises(VisError) as e:
        client.load_model(model.SerializeToString(), name="opset-99")
    assert e.value.details.startswith("model: onnxruntime cannot load the model: ONNX Runtime only *guarantees*")
    assert "[ONNXRuntimeError]" not in e.value.details and ".h:" not in e.value.details


def test_a_lab_tiff_for_a_greyscale_model_is_an_invalid_image(stubs, digits):
    _, vis = stubs
    buf = io.BytesIO()
    Image.new("LAB", (32, 32)).save(buf, "TIFF")
    with pytest.raises(grpc.RpcError) as e:
        list(vis.Activations(vis_pb2.ActivationsRequest(model="digits", layers=["conv1"],
                                                        input=vis_pb2.InputBatch(images=[buf.getvalue()]))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("input.images[0]: cannot convert a LAB image"), e.value.details()


def test_a_huge_name_is_shortened_in_the_error(client, digits, digit_images):
    with pytest.raises(VisError) as e:
        client.activations(digits, [digit_images[0]], ["x" * 20000])
    assert_status(e, grpc.StatusCode.NOT_FOUND, "(20000 characters)")
    assert len(e.value.details) < 2000
    with pytest.raises(VisError) as e:
        client.model("m" * 100000).inspect()
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "(100000 characters) is not a valid model name")


def test_known_names_are_listed_once(client, digits):
    with pytest.raises(VisError) as e:
        client.model("zzzzzzzz-nothing-like-it").inspect()
    known = e.value.details.split("known: ", 1)[1]
    names = [n.strip(" .'") for n in known.split(",")]
    assert len(names) == len(set(names)), known


def test_malformed_request_bytes_are_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        for method in ("/vis.v1.ModelService/Inspect", "/vis.v1.VisService/Activations"):
            call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as e:
                call(b"\xff\xff\xff\xff", timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "request bytes are not a valid vis.v1." in e.value.details()
        # a client stream (Upload): the abort raised inside the handler's error wrapper came back
        # as INTERNAL with a logged traceback
        upload = channel.stream_unary("/vis.v1.ModelService/Upload", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            upload(iter([b"\xff\xfe\xfd", b"\x01\x02"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "request bytes are not a valid vis.v1.UploadRequest" in e.value.details()


def test_too_many_images_are_refused_before_decoding():
    """The batch limit is checked on the number of images, before any is decoded (2,000 images
    were decoded first: seconds of work and GBs of memory, then RESOURCE_EXHAUSTED)."""
    running = start_server(ServerConfig(port=0, model_repository=DEFAULT_REPOSITORY, limits=Limits(max_batch=2)))
    try:
        _, vis = None, None
        with grpc.insecure_channel(running.address) as channel:
            from vis_service.gen import vis_pb2_grpc
            vis = vis_pb2_grpc.VisServiceStub(channel)
            junk = [b"not an image"] * 3   # decoding would fail: the limit answers first
            with pytest.raises(grpc.RpcError) as e:
                list(vis.Activations(vis_pb2.ActivationsRequest(model="digits", input=vis_pb2.InputBatch(images=junk))))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.value.details().startswith("input.images: 3 images exceed the limit of 2")
    finally:
        running.stop(grace=0)


def test_long_calls_on_every_work_slot_leave_health_and_light_calls_answered():
    """--workers long calls at once: one more is RESOURCE_EXHAUSTED (after WorkSlots.GRACE_S); health, server info,
    List and Inspect still answer (they used to wait behind the long calls until they timed out)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running = start_server(ServerConfig(port=0, model_repository=DEFAULT_REPOSITORY, workers=1))
    try:
        with Client(running.address) as c:
            digits = c.model("digits")
            cancel, started = threading.Event(), threading.Event()
            errors = []

            def long_call():
                try:
                    c.maximize(digits, [Objective.channel("conv1", 0)], steps=100000, cancel=cancel,
                               on_step=lambda *_: started.set())
                except VisError as exc:
                    errors.append(exc)

            worker = threading.Thread(target=long_call)
            worker.start()
            assert started.wait(60)
            with pytest.raises(VisError) as e:
                c.gradient(digits, np.zeros((1, 1, 32, 32), np.float32))
            assert_status(e, grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is busy: all 1 work slots are taken")
            with grpc.insecure_channel(running.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert c.server_info()["provider"] and c.list_models()[0] and digits.inspect().nodes
            cancel.set()
            worker.join(60)
            assert errors and errors[0].code == grpc.StatusCode.CANCELLED
            deadline = time.monotonic() + 30
            while True:   # the slot is free again once the cancelled call has unwound
                try:
                    assert c.gradient(digits, np.zeros((1, 1, 32, 32), np.float32)).gradient.shape == (1, 1, 32, 32)
                    break
                except VisError as exc:
                    if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
    finally:
        running.stop(grace=0)


def test_a_taken_work_slot_lets_two_calls_wait_and_refuses_the_others_at_once():
    """Each call waiting out WorkSlots.GRACE_S holds a server thread: eight refused callers at once held
    the threads kept for health checks and List (2 s answers; 32 callers: 8 s). Two may wait; a third
    is refused without waiting, and the two get the slot in turn."""
    from vis_service.api.registration import WorkSlots

    class Refused(Exception):
        pass

    class Context:
        def time_remaining(self):
            return None

        def abort(self, code, details):
            raise Refused(code, details)

    slots = WorkSlots(1)
    slots.GRACE_S = 60.0
    served = []

    def waiter(i):
        with slots.held(Context()):
            served.append(i)

    with slots.held(Context()):
        waiters = [threading.Thread(target=waiter, args=(i,)) for i in range(2)]
        for t in waiters:
            t.start()
        deadline = time.monotonic() + 30
        while slots._waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slots._waiting == 2
        started = time.monotonic()
        with pytest.raises(Refused) as e:
            with slots.held(Context()):
                pass
        assert time.monotonic() - started < 30 and e.value.args[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for t in waiters:
        t.join(30)
    assert sorted(served) == [0, 1] and slots._waiting == 0


def test_back_to_back_calls_on_one_work_slot_are_never_refused():
    """A call's reply reaches the client a moment before its handler frees the work slot: with
    --workers 1, about 3 in 1000 back-to-back Gradient calls were refused RESOURCE_EXHAUSTED
    (a call now waits WorkSlots.GRACE_S for a slot)."""
    running = start_server(ServerConfig(port=0, model_repository=DEFAULT_REPOSITORY, workers=1))
    try:
        with Client(running.address) as c:
            x = np.zeros((1, 1, 32, 32), np.float32)
            for _ in range(2000):
                c.gradient("digits", x)
    finally:
        running.stop(grace=0)


@pytest.mark.parametrize("method", ["saliency", "gradient_x_input", "guided_backprop", "smoothgrad"])
def test_a_negative_batch_is_refused_by_every_attribution_method(server, digits, digit_images, method):
    from vis_service.gen import attribution_pb2, attribution_pb2_grpc

    request = attribution_pb2.AttributionRequest(model="digits", method=method, batch=-1,
                                                 input=vis_pb2.InputBatch(images=[digit_images[0].read_bytes()]))
    code, details = raw_status(server, attribution_pb2_grpc.AttributionServiceStub, "Attribute", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("batch: must be >= 0"), details


def _with_outputs(*outputs, inputs=(("x", TensorProto.FLOAT),)) -> bytes:
    """x [N, 1, 4, 4] -> y (Identity) and a Cast of x per (name, ONNX type) in `outputs`."""
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    nodes += [helper.make_node("Cast", ["x"], [name], to=elem) for name, elem in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, ["N", 1, 4, 4]) for n, t in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 4, 4])]
                              + [helper.make_tensor_value_info(n, t, ["N", 1, 4, 4]) for n, t in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


def test_tensors_of_types_results_cannot_carry(client):
    """A STRING / UINT16 output: Inspect names its type as KServe does; Activations of it is
    INVALID_ARGUMENT naming the type (was INTERNAL on every call); the other outputs still work.
    An input of such a type is refused at upload (no request could feed it)."""
    m = client.load_model(_with_outputs(("text", TensorProto.STRING), ("wide", TensorProto.UINT16)))
    info = m.inspect().model
    assert {o.name: o.datatype for o in info.outputs} == {"y": "FP32", "text": "BYTES", "wide": "UINT16"}
    x = np.ones((1, 1, 4, 4), np.float32)
    for layers in (["wide"], []):
        with pytest.raises(VisError) as e:
            client.activations(m, x, layers)
        assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "layers: tensor", "which results cannot carry")
    np.testing.assert_array_equal(client.activations(m, x, ["y"])["y"], x)
    with pytest.raises(VisError) as e:
        client.load_model(_with_outputs(inputs=(("x", TensorProto.FLOAT), ("flag", TensorProto.UINT16))))
    assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "input 'flag' is of ONNX type UINT16, which requests cannot carry")


def _scalar_model(output_rank0: bool = False) -> bytes:
    """y = Clip(x, lo, hi) with scalar inputs lo, hi; with `output_rank0` also s = ReduceSum(x) (rank 0)."""
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    if output_rank0:
        nodes.append(helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
                                           helper.make_tensor_value_info("lo", TensorProto.FLOAT, []),
                                           helper.make_tensor_value_info("hi", TensorProto.FLOAT, [])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_scalar_inputs_can_be_fed(client):
    """Rank-0 inputs (Clip's bounds): the client sent them as [1] and the server refused a rank-0
    tensor as an 'empty batch'."""
    m = client.load_model(_scalar_model())
    x = np.array([[-2.0, 0.5, 3.0], [1.0, -1.0, 0.2]], np.float32)
    feeds = {"x": x, "lo": np.float32(-1.0), "hi": np.array(1.0, np.float32)}
    np.testing.assert_array_equal(client.activations(m, feeds, ["y"])["y"], np.clip(x, -1, 1))
    g = client.gradient(m, feeds, Target.tensor("y", np.ones_like(x)), wrt=["x"]).gradient
    np.testing.assert_array_equal(g, ((x > -1) & (x < 1)).astype(np.float32))


def test_images_that_do_not_fit_the_input_are_named_as_images(client, digit_images):
    """The decoded images' shape refused under 'input.tensors[x]', a field the request did not set."""
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    m = client.load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                            ir_version=8).SerializeToString(), name="scalar-only")
    with pytest.raises(VisError) as e:
        client.activations(m, [digit_images[0]], ["y"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("input.images: shape [1, ") and e.value.details.endswith("the model takes []")


def test_targets_on_tensors_without_a_batch_dimension_are_invalid(client):
    """A class / channel target on a scalar output, and a top-1 target there, were IndexErrors or
    onnxruntime errors (INTERNAL); a float64 top-1 target ran into onnxruntime's missing double OneHot."""
    m = client.load_model(_scalar_model(output_rank0=True))
    feeds = {"x": np.ones((2, 3), np.float32), "lo": np.float32(-1.0), "hi": np.float32(1.0)}
    for target in (Target.output(output="s"), Target.output(0, output="s"), Target.channel("s", 0),
                   Target.tensor("s", np.float32(1.0))):
        with pytest.raises(VisError) as e:
            client.gradient(m, feeds, target, wrt=["x"])
        assert_status(e, grpc.StatusCode.INVALID_ARGUMENT, "target: tensor 's'")


def test_a_top1_target_on_a_float64_output(client):
    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    m = client.load_model(model.SerializeToString())
    x = np.array([[1.0, -3.0, 2.0, 0.5]])
    g = client.gradient(m, x, Target.output())
    np.testing.assert_array_equal(g.gradient, [[0.0, -6.0, 0.0, 0.0]])
    assert list(g.target_index) == [1]
