"""The server's request reader (api/requests.py): large raw inputs read in place, the rest of the
request as protobuf parses it; anything unusual on the wire left to protobuf."""
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from vis_client.wire import request_with_payloads
from vis_service.api.requests import IN_PLACE_MIN_BYTES, RequestView, request_reader
from vis_service.api.tensors import _varint
from vis_service.gen import attribution_pb2, vis_pb2

RNG = np.random.default_rng(0)
read = request_reader(attribution_pb2.AttributionRequest)


def _request():
    big = RNG.standard_normal((2, 3, 64, 64)).astype(np.float32)  # 96 KiB
    small = RNG.standard_normal((2, 5)).astype(np.float32)
    req = attribution_pb2.AttributionRequest(model="m-1", method="smoothgrad", batch=7,
                                             target=vis_pb2.Target(output=vis_pb2.OutputTarget(index=[2, 9])))
    req.smoothgrad.samples = 12
    req.input.images.append(b"\x89PNG not really")
    req.input.preprocess.preset = "imagenet"
    req.input.tensors.add(name="pixels", datatype="FP32", shape=list(big.shape), raw_contents=big.tobytes())
    req.input.tensors.add(name="extra", datatype="FP32", shape=list(small.shape), raw_contents=small.tobytes())
    return req, big


def _assert_reads_as(got, expected):
    for field in ("model", "method", "batch"):
        assert getattr(got, field) == getattr(expected, field)
    assert got.target == expected.target and got.smoothgrad == expected.smoothgrad
    assert got.HasField("input") and got.input.HasField("preprocess")
    assert got.input.preprocess == expected.input.preprocess and list(got.input.images) == list(expected.input.images)
    assert len(got.input.tensors) == len(expected.input.tensors)
    for t, e in zip(got.input.tensors, expected.input.tensors):
        assert (t.name, t.datatype, list(t.shape), t.in_shared_memory) == (e.name, e.datatype, list(e.shape),
                                                                           e.in_shared_memory)
        assert bytes(t.raw_contents) == e.raw_contents


@pytest.mark.parametrize("encoding", ["protobuf", "client"])
def test_large_inputs_are_read_in_place(encoding):
    req, big = _request()
    if encoding == "protobuf":
        wire = req.SerializeToString()
    else:  # as the Python client writes it: fields reordered, payload spliced in
        payload = req.input.tensors[0].raw_contents
        req.input.tensors[0].ClearField("raw_contents")
        wire = request_with_payloads(req, {0: np.frombuffer(payload, np.uint8)})
        req.input.tensors[0].raw_contents = payload
    got = read(wire)
    assert isinstance(got, RequestView)
    _assert_reads_as(got, req)
    data = got.input.tensors[0].raw_contents
    assert isinstance(data, memoryview) and data.obj is wire  # not copied
    assert np.array_equal(np.frombuffer(data, np.float32).reshape(big.shape), big)
    assert isinstance(got.input.tensors[1].raw_contents, bytes)  # small: parsed as usual


def test_small_and_unusual_requests_are_parsed_by_protobuf():
    req, _ = _request()
    small = attribution_pb2.AttributionRequest(model="m", input=vis_pb2.InputBatch(images=[b"x" * 10]))
    assert type(read(small.SerializeToString())) is attribution_pb2.AttributionRequest
    # `input` in two pieces (protobuf merges them: the tensors of both)
    wire = req.SerializeToString()
    extra = attribution_pb2.AttributionRequest(input=vis_pb2.InputBatch(tensors=[req.input.tensors[0]]))
    twice = wire + extra.SerializeToString()
    expected = attribution_pb2.AttributionRequest.FromString(twice)
    got = read(twice)
    assert type(got) is attribution_pb2.AttributionRequest and got == expected and len(got.input.tensors) == 3
    # raw_contents twice in one tensor (protobuf keeps the last)
    t = vis_pb2.Tensor(name="a", datatype="UINT8", shape=[IN_PLACE_MIN_BYTES])
    body = (t.SerializeToString() + vis_pb2.Tensor(raw_contents=b"\1" * IN_PLACE_MIN_BYTES).SerializeToString()
            + vis_pb2.Tensor(raw_contents=b"\2" * IN_PLACE_MIN_BYTES).SerializeToString())
    batch = b"\x0a" + _varint(len(body)) + body  # InputBatch.tensors = 1
    wire = b"\x12" + _varint(len(batch)) + batch  # AttributionRequest.input = 2
    got = read(wire)
    assert type(got) is attribution_pb2.AttributionRequest and got.input.tensors[0].raw_contents == b"\2" * IN_PLACE_MIN_BYTES
    # garbage: the parser's error, as before
    with pytest.raises(DecodeError):
        read(b"\x12\xff\xff\xff\x0f" + bytes(IN_PLACE_MIN_BYTES))


def test_requests_with_very_many_fields_go_to_protobuf():
    # a Python walk over millions of tiny fields would hold a worker: past 4096 fields in all (any
    # level) the C parser reads the request
    big = np.zeros((1, 3, 128, 128), np.float32)
    for count in (100, 5000):
        req = vis_pb2.ActivationsRequest(model="m", layers=["x"] * count)
        req.input.tensors.add(datatype="FP32", shape=list(big.shape), raw_contents=big.tobytes())
        got = request_reader(vis_pb2.ActivationsRequest)(req.SerializeToString())
        assert isinstance(got, RequestView) == (count == 100)
        assert list(got.layers) == list(req.layers) and bytes(got.input.tensors[0].raw_contents) == big.tobytes()
    # spread over many tensors: the budget counts every level
    req = vis_pb2.ActivationsRequest(model="m")
    req.input.tensors.add(datatype="FP32", shape=list(big.shape), raw_contents=big.tobytes())
    for _ in range(1500):
        req.input.tensors.add(name="t", datatype="FP32", shape=[1])
    got = request_reader(vis_pb2.ActivationsRequest)(req.SerializeToString())
    assert type(got) is vis_pb2.ActivationsRequest and len(got.input.tensors) == 1501


def test_large_tensors_travel_in_place_through_the_server(server, client, digits, monkeypatch):
    """End to end, without shared memory: the client splices a 256 KiB input into its request, the
    server reads it in place (its registered reader is `request_reader`), the client reads the
    large result chunks in place; the activations equal those of calls whose inputs are small
    enough to travel inside protobuf messages."""
    import vis_client.wire as wire
    from vis_client import Client

    in_place = []
    real_read = wire.read_result_chunk

    def counting_read(b):
        got = real_read(b)
        in_place.append(isinstance(got, wire.TensorResultChunk))
        return got
    monkeypatch.setattr(wire, "read_result_chunk", counting_read)  # taken by stubs made from now on
    x = np.random.default_rng(1).standard_normal((64, 1, 32, 32)).astype(np.float32)
    layers = [n.outputs[0] for n in client.inspect(digits).nodes if n.op_type == "Conv"][:1]
    with Client(server.address) as c:
        big = c.activations(digits.id, x, layers)
    assert any(in_place)
    small = {k: np.concatenate([client.activations(digits, x[i:i + 4], layers)[k] for i in range(0, 64, 4)])
             for k in big}
    for k in big:
        assert np.array_equal(big[k], small[k]), k
