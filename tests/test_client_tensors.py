"""Client tensor codec and chunk reassembly (no server needed)."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import vis_client  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from vis_client.gen import vis_pb2
from vis_client.tensors import DATATYPES, ChunkAssembler, CorruptStream, datatype_of, from_proto, to_proto

RNG = np.random.default_rng(0)


def _sample(dtype, shape=(2, 3, 4)):
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return RNG.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)
    return RNG.standard_normal(shape).astype(dt)


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_round_trip_all_dtypes(datatype):
    a = _sample(DATATYPES[datatype])
    t = to_proto("x", a)
    assert t.datatype == datatype and list(t.shape) == [2, 3, 4] and t.name == "x"
    assert len(t.raw_contents) == a.size * a.itemsize
    b = from_proto(t)
    assert b.dtype == DATATYPES[datatype] and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    b[...] = 0  # writable, independent of the message


def test_wire_format_is_little_endian_row_major():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert to_proto("", a).raw_contents == np.arange(6, dtype="<i4").tobytes()
    assert to_proto("", np.float32(1.0)).raw_contents == b"\x00\x00\x80\x3f"


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2", ">i8", ">i4", ">i2"])
def test_big_endian_input(dtype):
    a = _sample(np.dtype(dtype).newbyteorder("<")).astype(dtype)
    assert a.dtype.byteorder == ">"
    t = to_proto("x", a)
    assert t.raw_contents == a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(from_proto(t), a)


def test_non_contiguous_inputs():
    base = _sample(np.float32, (4, 6, 8))
    for view in (base[:, ::2, 1::3], base.transpose(2, 0, 1), np.asfortranarray(base), base[::-1]):
        assert not view.flags.c_contiguous
        out = from_proto(to_proto("v", view))
        assert out.shape == view.shape
        np.testing.assert_array_equal(out, view)


def test_scalar_and_empty():
    np.testing.assert_array_equal(from_proto(to_proto("s", np.float64(2.5))), np.float64(2.5))
    e = from_proto(to_proto("e", np.zeros((0, 3), np.float32)))
    assert e.shape == (0, 3) and e.dtype == np.float32


def test_unsupported_dtype_and_bad_message():
    with pytest.raises(TypeError):
        to_proto("c", np.zeros(2, np.complex64))
    with pytest.raises(TypeError):
        datatype_of(np.uint16)
    with pytest.raises(ValueError, match="unknown tensor datatype"):
        from_proto(vis_pb2.Tensor(name="x", datatype="BF16", shape=[1], raw_contents=b"\0\0"))
    with pytest.raises(ValueError, match="expected 8"):
        from_proto(vis_pb2.Tensor(name="x", datatype="FP32", shape=[2], raw_contents=b"\0\0\0\0"))


def _chunks(name, a, size):
    t = to_proto(name, a)
    data = t.raw_contents
    offsets = range(0, len(data), size) if data else [0]
    return [vis_pb2.TensorChunk(name=name, datatype=t.datatype, shape=t.shape, total_bytes=len(data),
                                offset=o, data=data[o:o + size]) for o in offsets]


def test_reassemble_many_chunks():
    a = _sample(np.float32, (3, 16, 7, 5))
    chunks = _chunks("act", a, 97)  # not a multiple of the item size
    assert len(chunks) > 50
    asm = ChunkAssembler()
    outs = [asm.add(c) for c in chunks]
    assert all(o is None for o in outs[:-1])
    name, b = outs[-1]
    assert name == "act"
    np.testing.assert_array_equal(a, b)
    assert asm.pending == []
    asm.finish()


def test_interleaved_tensors():
    a = _sample(np.float32, (2, 8, 9))
    b = _sample(np.int64, (5, 11))
    c = np.array([], dtype=np.uint8)
    ca, cb, cc = _chunks("a", a, 64), _chunks("b", b, 40), _chunks("c", c, 10)
    stream = []
    for i in range(max(len(ca), len(cb))):
        stream += ca[i:i + 1] + cb[i:i + 1]
        if i == 3:
            stream += cc
    got = dict(ChunkAssembler().feed(stream))
    assert set(got) == {"a", "b", "c"}
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    assert got["c"].shape == (0,) and got["c"].dtype == np.uint8


def test_single_chunk_tensor():
    a = np.arange(4, dtype=np.int16)
    (chunk,) = _chunks("x", a, 1 << 20)
    np.testing.assert_array_equal(from_proto(chunk), a)
    assert ChunkAssembler().add(chunk)[1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("corrupt, match", [
    ("gap", "offset"),
    ("reorder", "offset"),
    ("first_not_zero", "first chunk"),
    ("overflow", "more than total_bytes"),
    ("truncated", "incomplete"),
    ("shape_changed", "changed"),
    ("total_mismatch", "does not match"),
    ("after_complete", "after the tensor was complete"),
    ("bad_datatype", "unknown tensor datatype"),
])
def test_corrupt_streams(corrupt, match):
    a = _sample(np.float32, (4, 10))
    ch = _chunks("x", a, 32)
    if corrupt == "gap":
        del ch[2]
    elif corrupt == "reorder":
        ch[1], ch[2] = ch[2], ch[1]
    elif corrupt == "first_not_zero":
        ch = ch[1:]
    elif corrupt == "overflow":
        ch[-1].data += b"\0" * 8
    elif corrupt == "truncated":
        ch = ch[:-1]
    elif corrupt == "shape_changed":
        del ch[3].shape[:]
        ch[3].shape.extend([10, 4])
    elif corrupt == "total_mismatch":
        for c in ch:
            c.total_bytes += 4
    elif corrupt == "after_complete":
        ch.append(ch[-1])
    elif corrupt == "bad_datatype":
        for c in ch:
            c.datatype = "FP8"
    with pytest.raises((CorruptStream, ValueError), match=match):
        list(ChunkAssembler().feed(ch))


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "INT64", "BOOL", "UINT8"])
def test_request_with_spliced_payloads_parses_as_the_message(datatype):
    """A request written with its raw inputs spliced into the wire bytes (wire.request_with_payloads)
    reads back as the same message with those bytes in raw_contents: every other field (of the
    request, of the batch, of each tensor) and the tensors' order kept."""
    from vis_client.gen import attribution_pb2
    from vis_client.wire import request_with_payloads

    big = np.ascontiguousarray(_sample(DATATYPES[datatype], (3, 5, 7, 11)))
    small = _sample(np.float32, (3, 2))
    req = attribution_pb2.AttributionRequest(model="m-1", method="integrated_gradients", batch=17,
                                             target=vis_pb2.Target(output=vis_pb2.OutputTarget(index=[3, 1, 4])))
    req.integrated_gradients.steps = 50
    req.input.preprocess.preset = "imagenet"
    req.input.tensors.add(name="first", datatype=datatype, shape=list(big.shape))
    req.input.tensors.append(to_proto("second", small))
    req.input.tensors.add(name="third", datatype="FP32", shape=[3, 2])
    expected = attribution_pb2.AttributionRequest()
    expected.CopyFrom(req)
    expected.input.tensors[0].raw_contents = big.tobytes()
    expected.input.tensors[2].raw_contents = (small + 1).tobytes()
    wire = request_with_payloads(req, {0: big, 2: small + 1})
    assert attribution_pb2.AttributionRequest.FromString(wire) == expected
    assert not req.input.tensors[0].raw_contents  # the request itself is left as it was


def test_large_result_chunks_are_read_in_place():
    """wire.read_result_chunk: a chunk of a large tensor (as the server encodes it, and with its fields
    in another order) gives the fields the parser gives and its data as a view of the received bytes;
    small chunks, other messages and encodings it does not read are parsed as usual."""
    from vis_client.wire import TensorResultChunk, _varint, read_result_chunk

    payload = RNG.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    chunk = vis_pb2.TensorChunk(name="conv1", datatype="FP32", shape=[1, 3, 250, 100], total_bytes=300_000,
                                offset=0, data=payload)
    reordered = (vis_pb2.TensorChunk(data=payload).SerializeToString()
                 + vis_pb2.TensorChunk(name="conv1", datatype="FP32", shape=[1, 3, 250, 100],
                                       total_bytes=300_000).SerializeToString())
    for body in (chunk.SerializeToString(), reordered):
        wire = bytes([0x12]) + _varint(len(body)) + body
        expected = vis_pb2.ResultChunk.FromString(wire)
        got = read_result_chunk(wire)
        assert isinstance(got, TensorResultChunk) and got.WhichOneof("kind") == "tensor"
        t = got.tensor
        assert isinstance(t.data, memoryview) and t.data.obj is wire  # no copy
        assert bytes(t.data) == expected.tensor.data == payload
        for field in ("name", "datatype", "total_bytes", "offset", "shm_offset", "in_shared_memory"):
            assert getattr(t, field) == getattr(expected.tensor, field), field
        assert list(t.shape) == list(expected.tensor.shape)
    # data twice (the parser keeps the last), a small chunk, a closing ResultInfo: parsed as usual
    twice = chunk.SerializeToString() + vis_pb2.TensorChunk(data=payload[::-1]).SerializeToString()
    small = vis_pb2.ResultChunk(tensor=vis_pb2.TensorChunk(name="x", data=b"abc"))
    info = vis_pb2.ResultChunk(info=vis_pb2.ResultInfo(text={"k": "v" * 100_000}))
    many = chunk.SerializeToString() + b"\x18\x01" * 70  # 70 more (unpacked) shape entries
    for wire in (bytes([0x12]) + _varint(len(twice)) + twice, small.SerializeToString(), info.SerializeToString(),
                 bytes([0x12]) + _varint(len(many)) + many):
        got = read_result_chunk(wire)
        assert isinstance(got, vis_pb2.ResultChunk) and got == vis_pb2.ResultChunk.FromString(wire)
    assert read_result_chunk(bytes([0x12]) + _varint(len(twice)) + twice).tensor.data == payload[::-1]


def test_assembler_takes_chunks_read_in_place():
    from vis_client.wire import read_result_chunk
    from vis_service.api.tensors import chunk_tensor

    a = RNG.standard_normal((4, 3, 100, 90)).astype(np.float32)
    assembler = ChunkAssembler()
    done = [assembler.add(read_result_chunk(b).tensor) for b in chunk_tensor("a", a, chunk_bytes=100_000)]
    assert all(d is None for d in done[:-1]) and len(done) == -(-a.nbytes // 100_000)
    name, b = done[-1]
    assert name == "a" and b.dtype == a.dtype and b.flags.writeable
    np.testing.assert_array_equal(a, b)
