"""Same-host shared memory for inputs and results (vis-shm-* metadata, Tensor / TensorChunk.in_shared_memory)."""
from __future__ import annotations

import gc
import mmap
import secrets
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

import vis_client.client as client_module
from vis_client import Client
from vis_client.shared_memory import INPUT_MIN_BYTES
from vis_client.tensors import ChunkAssembler, CorruptStream
from vis_service.default_models import DEFAULT_MODEL_DIR
from vis_service.api.tensors import tensor_to_proto
from vis_service.gen import vis_pb2

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="POSIX shared memory under /dev/shm (Linux) needed")


def digits_layers() -> list[str]:
    m = onnx.load(DEFAULT_MODEL_DIR / "model.onnx")
    return [n.output[0] for n in m.graph.node if n.op_type in ("Conv", "Relu", "MaxPool", "Gemm")]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    """Large enough (64 KiB) for the client to send it through the region."""
    x = np.random.default_rng(3).standard_normal((16, 1, 32, 32)).astype(np.float32)
    assert x.nbytes >= INPUT_MIN_BYTES
    return x


@pytest.fixture(scope="module")
def shm_client(server):
    with Client(server.address, shared_memory_bytes=16 << 20) as c:
        yield c


@pytest.fixture()
def sent(monkeypatch):
    """How each call's deferred inputs were sent: a list of (in_shared_memory, shm_offset) per call."""
    calls = []
    real = client_module._send_inputs

    def spy(batch, deferred, lease, **kw):
        unplaced = real(batch, deferred, lease, **kw)
        calls.append([(batch.tensors[i].in_shared_memory, batch.tensors[i].shm_offset) for i, _ in deferred])
        return unplaced

    monkeypatch.setattr(client_module, "_send_inputs", spy)
    return calls


def make_region(size: int = 16 << 20, name: str | None = None) -> shared_memory.SharedMemory:
    return shared_memory.SharedMemory(name=name or f"vis_test_{secrets.token_hex(6)}", create=True, size=size)


def drop(shm: shared_memory.SharedMemory) -> None:
    gc.collect()
    shm.close()
    shm.unlink()


@pytest.fixture()
def region():
    """A region made as a client makes it, for raw-stub calls."""
    shm = make_region()
    yield shm
    drop(shm)


def metadata_of(shm, size: int | None = None):
    return (("vis-shm-name", shm.name), ("vis-shm-size", str(shm.size if size is None else size)))


def shm_input(shm, arr: np.ndarray, offset: int = 0, name: str = "") -> vis_pb2.Tensor:
    """Write `arr` into the region at `offset`; the Tensor that refers to it."""
    np.frombuffer(shm.buf, arr.dtype, arr.size, offset)[:] = arr.reshape(-1)
    t = tensor_to_proto(name, arr)
    t.ClearField("raw_contents")
    t.in_shared_memory, t.shm_offset = True, offset
    return t


def raw_activations(stubs, request, metadata, region_buf=None):
    """Drain a raw Activations stream: (chunks, tensors reassembled with the region, copied out).

    `chunks`: the TensorChunks in order, those announced in the closing ResultInfo last."""
    chunks = []
    for m in stubs[1].Activations(request, metadata=metadata):
        if m.HasField("tensor"):
            chunks.append(m.tensor)
        elif m.HasField("info"):
            chunks.extend(m.info.tensors)
    assembler = ChunkAssembler(region_buf)
    tensors = dict(filter(None, (assembler.add(c) for c in chunks)))
    assembler.finish()
    return chunks, tensors


def in_shared_memory(arr: np.ndarray) -> bool:
    """Whether `arr` views a mapped region (rather than owning its bytes or viewing a message's)."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k  # bit for bit


def test_inputs_and_results_through_shared_memory_equal_streamed(client, shm_client, digits, x, sent):
    layers = digits_layers()
    assert len(layers) >= 3
    assert_same(shm_client.activations(digits.id, x, layers), client.activations(digits, x, layers))
    g_shm, g = shm_client.gradient(digits.id, x, 3), client.gradient(digits, x, 3)
    assert_same(g_shm.result.tensors, g.result.tensors)
    assert g_shm.labels == g.labels
    a_shm = shm_client.integrated_gradients(digits.id, x, None, steps=4)
    a = client.integrated_gradients(digits, x, None, steps=4)  # the run_streaming path
    assert_same(a_shm.result.tensors, a.result.tensors)
    assert a_shm.result.scalars == a.result.scalars
    conv = next(n.name for n in client.inspect(digits).nodes if n.op_type == "Conv")
    assert_same(shm_client.filters(digits.id, conv), client.filters(digits, conv))
    # the shared memory client sent its inputs through the region (from offset 0); the other inline
    shm_calls = [c for c in sent if c and c[0][0]]
    assert len(shm_calls) == 3 and all(c == [(True, 0)] for c in shm_calls)
    assert len([c for c in sent if c and not c[0][0]]) == 3
    # results are writable views into the region, not copies
    acts = shm_client.activations(digits.id, x, layers[:1])
    assert in_shared_memory(acts[layers[0]]) and acts[layers[0]].flags.writeable
    assert not any(in_shared_memory(v) for v in client.activations(digits, x, layers[:1]).values())


def test_small_inputs_travel_inline(client, shm_client, digits, x, sent):
    small = x[:2]
    assert small.nbytes < INPUT_MIN_BYTES
    assert_same(shm_client.activations(digits.id, small, ["logits"]), client.activations(digits, small, ["logits"]))
    assert sent == []  # nothing deferred: the small input was encoded into the request at once


def test_raw_request_with_input_in_the_region(client, stubs, digits, x, region):
    layers = digits_layers()
    expected = client.activations(digits, x, layers)
    offset = 64 * 3  # any offset works (64-byte alignment is the client's habit, not a rule)
    request = vis_pb2.ActivationsRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[shm_input(region, x, offset)]),
                                         layers=layers)
    chunks, got = raw_activations(stubs, request, metadata_of(region), region.buf)
    assert_same(got, expected)
    assert all(c.in_shared_memory for c in chunks)
    # results come after the input and never overlap it or each other
    spans = sorted((c.shm_offset, c.shm_offset + c.total_bytes) for c in chunks)
    assert spans[0][0] >= offset + x.nbytes and all(s % 64 == 0 for s, _ in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert np.array_equal(np.frombuffer(region.buf, np.float32, x.size, offset), x.reshape(-1))  # input untouched
    # a misaligned offset is read correctly too (the server copies it to an aligned array)
    request.input.tensors[0].CopyFrom(shm_input(region, x, 6))
    assert_same(raw_activations(stubs, request, metadata_of(region), region.buf)[1], expected)


def bad_input_cases(region, x):
    n = x.nbytes
    size = region.size
    return [
        ("outside the region", metadata_of(region), dict(shm_offset=size - n + 4), "input.tensors[0].shm_offset",
         f"0..{size - n}"),
        ("negative offset", metadata_of(region), dict(shm_offset=-64), "input.tensors[0].shm_offset", f"0..{size - n}"),
        ("beyond the declared size", metadata_of(region, n + 100), dict(shm_offset=128),
         "input.tensors[0].shm_offset", "0..100"),
        ("larger than the region", metadata_of(region, n - 4), dict(shm_offset=0), "input.tensors[0].shm_offset",
         "do not fit"),
        ("no region", None, dict(shm_offset=0), "input.tensors[0].in_shared_memory", "no shared memory region"),
        ("bytes as well", metadata_of(region), dict(shm_offset=0, raw_contents=b"\0" * n),
         "input.tensors[0].raw_contents", "must be empty"),
    ]


def test_bad_input_references_are_invalid_argument(client, stubs, digits, x, region):
    for what, metadata, fields, key, detail in bad_input_cases(region, x):
        t = shm_input(region, x)
        for k, v in fields.items():
            setattr(t, k, v)
        request = vis_pb2.ActivationsRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[t]), layers=["logits"])
        with pytest.raises(grpc.RpcError) as e:
            list(stubs[1].Activations(request, metadata=metadata))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert key in e.value.details() and detail in e.value.details(), (what, e.value.details())
    # only an InputBatch's tensors may lie in the region: a cotangent there is refused
    t = shm_input(region, np.zeros((16, 10), np.float32))
    request = vis_pb2.GradientRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[tensor_to_proto("", x)]),
                                      target=vis_pb2.Target(tensor=vis_pb2.TensorTarget(layer="logits", cotangent=t)))
    with pytest.raises(grpc.RpcError) as e:
        list(stubs[1].Gradient(request, metadata=metadata_of(region)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "target.tensor.cotangent.in_shared_memory" in e.value.details()
    assert client.activations(digits, x, ["logits"])["logits"].shape == (16, 10)  # still serving


def test_server_writes_into_the_region_and_streams_what_does_not_fit(client, stubs, digits, x, region):
    layers = digits_layers()
    request = vis_pb2.ActivationsRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[tensor_to_proto("", x)]),
                                         layers=layers)
    expected = client.activations(digits, x, layers)
    sizes = [expected[n].nbytes for n in layers]
    # room for the first tensor (and maybe small ones), not for all: the rest is streamed
    declared = sizes[0] + 64
    assert sum(sizes) > declared
    chunks, got = raw_activations(stubs, request, metadata_of(region, declared), region.buf[:declared])
    assert_same(got, expected)
    placed = [c for c in chunks if c.in_shared_memory]
    assert placed[0].name == layers[0] and placed[0].shm_offset == 0 and not placed[0].data
    assert all(c.shm_offset + c.total_bytes <= declared for c in placed)
    assert any(not c.in_shared_memory and c.data for c in chunks)  # fallback
    assert [c.name for c in chunks if c.offset == 0] == layers  # in order, though placed ones wait for the info
    # the whole region: every tensor placed, none streamed, the whole answer is one message
    chunks, got = raw_activations(stubs, request, metadata_of(region), region.buf)
    assert_same(got, expected)
    assert sum(sizes) <= region.size and all(c.in_shared_memory and not c.data for c in chunks)
    messages = list(stubs[1].Activations(request, metadata=metadata_of(region)))
    assert len(messages) == 1 and [c.name for c in messages[0].info.tensors] == layers


@pytest.mark.parametrize("metadata, key", [
    ((("vis-shm-name", "../etc/passwd"), ("vis-shm-size", "4096")), "vis-shm-name"),
    ((("vis-shm-name", "vis_a/b"), ("vis-shm-size", "4096")), "vis-shm-name"),
    ((("vis-shm-name", "other_region"), ("vis-shm-size", "4096")), "vis-shm-name"),
    ((("vis-shm-name", "vis_" + "a" * 65), ("vis-shm-size", "4096")), "vis-shm-name"),
    ((("vis-shm-name", "vis_does_not_exist_" + secrets.token_hex(4)), ("vis-shm-size", "4096")), "vis-shm-name"),
    ((("vis-shm-size", "4096"),), "vis-shm-name"),
    ((("vis-shm-name", "vis_x"),), "vis-shm-size"),
    ((("vis-shm-name", "vis_x"), ("vis-shm-size", "-5")), "vis-shm-size"),
])
def test_bad_region_metadata_is_invalid_argument(stubs, client, digits, x, metadata, key):
    request = vis_pb2.ActivationsRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[tensor_to_proto("", x)]))
    with pytest.raises(grpc.RpcError) as e:
        list(stubs[1].Activations(request, metadata=metadata))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert key in e.value.details()
    assert client.activations(digits, x, ["logits"])["logits"].shape == (16, 10)  # still serving


def test_declared_size_larger_than_the_region(stubs, client, digits, x, region):
    request = vis_pb2.GradientRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[tensor_to_proto("", x)]))
    with pytest.raises(grpc.RpcError) as e:
        list(stubs[1].Gradient(request, metadata=metadata_of(region, region.size + 4096)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vis-shm-size" in e.value.details() and str(region.size) in e.value.details()
    assert (SHM / region.name).exists()  # the server never deletes a region
    assert client.gradient(digits, x, 1).gradient.shape == x.shape


def test_results_are_views_whose_region_waits_for_them(server, client, digits, x):
    layers = digits_layers()
    y = x[::-1].copy()
    want_x, want_y = client.activations(digits, x, layers), client.activations(digits, y, layers)
    with Client(server.address, shared_memory_bytes=16 << 20) as c:
        first = c.activations(digits.id, x, layers)
        snapshot = {k: v.copy() for k, v in first.items()}
        second = c.activations(digits.id, y, layers)  # must not land in the region `first` views
        assert_same(first, snapshot)
        assert_same(first, want_x)
        assert_same(second, want_y)
        assert c._shared.created == 2
        # only part of a result kept alive: its region stays leased
        keep = first[layers[-1]][:2]
        del first, second
        gc.collect()
        third = c.activations(digits.id, y, layers)
        assert c._shared.created == 2 and np.array_equal(keep, want_x[layers[-1]][:2])
        del third
        # dropped results give their region back: the pool does not grow
        for i in range(20):
            got = c.activations(digits.id, x if i % 2 else y, layers)
            assert_same(got, want_x if i % 2 else want_y)
            del got
        assert c._shared.created == 2
        del keep
        gc.collect()
        for _ in range(3):
            c.activations(digits.id, x, layers)
        assert c._shared.created == 2
        # with every region leased, the next call is streamed (and still correct)
        held = [c.activations(digits.id, x, layers) for _ in range(5)]
        assert c._shared.created == 4
        assert [in_shared_memory(h[layers[0]]) for h in held] == [True] * 4 + [False]
        for h in held:
            assert_same(h, want_x)


def test_server_mapping_cache_follows_a_recreated_region(server, client, stubs, digits, x):
    layers = ["logits"]
    y = x[::-1].copy()
    want_x, want_y = client.activations(digits, x, layers), client.activations(digits, y, layers)
    cache = server.state.regions
    name = f"vis_test_{secrets.token_hex(6)}"

    def call(shm, arr):
        request = vis_pb2.ActivationsRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[shm_input(shm, arr)]),
                                             layers=layers)
        return raw_activations(stubs, request, metadata_of(shm), shm.buf)[1]

    shm = make_region(4 << 20, name)
    mapped = cache.mapped
    assert_same(call(shm, x), want_x)
    assert_same(call(shm, y), want_y)
    assert cache.mapped == mapped + 1  # the second call reused the mapping
    drop(shm)  # retired; a new region under the same name, same size, other contents
    shm = make_region(4 << 20, name)
    try:
        assert_same(call(shm, x), want_x)  # not the stale mapping (which held y)
        assert cache.mapped == mapped + 2
    finally:
        drop(shm)
    shm = make_region(2 << 20, name)  # and again, another size
    try:
        assert_same(call(shm, y), want_y)
    finally:
        drop(shm)
    cache.sweep()  # (every shared memory call does, when it ends) drops mappings whose region is gone
    assert name not in cache._entries


def test_concurrent_calls_on_one_client_and_close_unlinks(server, client, digits, x):
    layers = digits_layers()
    inputs = [np.roll(x, i, axis=0) for i in range(8)]
    expected = [client.activations(digits, a, layers) for a in inputs]
    c = Client(server.address, shared_memory_bytes=16 << 20)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: c.activations(digits.id, a, layers), inputs * 2))
    for got, want in zip(results, expected * 2):
        assert_same(got, want)
    names = c._shared.names
    assert 1 <= c._shared.created <= 4 and all((SHM / n).exists() for n in names)
    c.close()  # results still alive: their memory stays valid, the names are gone
    assert not any((SHM / n).exists() for n in names)
    for got, want in zip(results, expected * 2):
        assert_same(got, want)


def test_failed_call_retires_the_region(server, client, digits, x):
    with Client(server.address, shared_memory_bytes=16 << 20) as c:
        first = c._shared.name
        with pytest.raises(Exception):
            c.activations(digits.id, x, ["no_such_layer"])
        assert not (SHM / first).exists()  # replaced: the server may have been writing into it
        assert_same(c.activations(digits.id, x, ["logits"]), client.activations(digits, x, ["logits"]))
        assert c._shared.name != first and (SHM / c._shared.name).exists()


def test_assembler_refuses_overlapping_results():
    buf = np.zeros(4096, np.uint8)

    def chunk(name, offset, n=16):
        return vis_pb2.TensorChunk(name=name, datatype="FP32", shape=[n], total_bytes=4 * n, shm_offset=offset,
                                   in_shared_memory=True)

    a = ChunkAssembler(buf, views=True, reserved=256)
    name, arr = a.add(chunk("a", 256))
    assert np.shares_memory(arr, buf) and arr.shape == (16,)
    with pytest.raises(CorruptStream, match="overlap"):
        a.add(chunk("b", 256 + 32))  # inside "a"
    with pytest.raises(CorruptStream, match="overlap"):
        a.add(chunk("c", 192))  # inside the inputs
    with pytest.raises(CorruptStream, match="outside"):
        a.add(chunk("d", 4096 - 32))
    assert not np.shares_memory(ChunkAssembler(buf).add(chunk("e", 512))[1], buf)  # copied out by default


def test_results_computed_into_the_region_fall_back_when_onnxruntime_refuses(client, shm_client, digits, x,
                                                                           monkeypatch):
    from vis_service.runtime.sessions import Session

    layers = digits_layers()
    used, run_into = [], Session.run_into
    monkeypatch.setattr(Session, "run_into", lambda self, o, f: used.append(1) or run_into(self, o, f))
    assert_same(shm_client.activations(digits.id, x, layers), client.activations(digits, x, layers))
    assert used  # onnxruntime wrote the results into the region

    def refuse(self, outputs, feeds):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Session, "run_into", refuse)
    got = shm_client.activations(digits.id, x, layers)  # run as usual, results copied into the region
    assert_same(got, client.activations(digits, x, layers))
    assert all(in_shared_memory(v) for v in got.values())


def test_shared_input_is_sent_where_it_lies(server, client, digits, x, sent):
    layers = digits_layers()
    want = client.activations(digits, x, layers)
    want_double = client.activations(digits, 2 * x, layers)
    with Client(server.address, shared_memory_bytes=16 << 20, shared_memory_regions=2) as c:
        buf = c.shared_input(x.shape, np.float32)
        assert buf.shape == x.shape and buf.dtype == np.float32 and buf.flags.c_contiguous
        buf[:] = x
        sent.clear()
        first = c.activations(digits.id, buf, layers)
        assert_same(first, want)
        assert c._shared.in_place_inputs == 1 and sent == [[(True, 0)]]
        # `first` still views the input's region: the next call copies the input into the other one
        second = c.activations(digits.id, buf, layers)
        assert_same(second, want)
        assert_same(first, want)
        assert c._shared.in_place_inputs == 1 and c._shared.created == 2
        # both regions busy (the input's and `second`'s): streamed, still correct
        assert_same(c.activations(digits.id, {"": buf}, layers), want)
        del first, second
        gc.collect()
        buf *= 2  # the array is the input: the next call sees what it holds now
        assert_same(c.activations(digits.id, {"": buf}, layers), want_double)
        assert c._shared.in_place_inputs == 2
        # a view of the array keeps its region pinned; dropping every view frees it for any call
        part = buf[:4]
        del buf
        gc.collect()
        with pytest.raises(RuntimeError, match="in use"):
            c.shared_input((1,)), c.shared_input((1,))
        del part
        gc.collect()
        y = x[::-1].copy()
        assert_same(c.activations(digits.id, y, layers), client.activations(digits, y, layers))
        assert c._shared.created == 2


def test_shared_input_needs_shared_memory_and_a_fitting_size(server):
    with Client(server.address) as c, pytest.raises(RuntimeError, match="shared_memory_bytes"):
        c.shared_input((4, 4))
    with Client(server.address, shared_memory_bytes=1 << 20) as c:
        with pytest.raises(ValueError, match="does not fit"):
            c.shared_input((1 << 20,), np.float32)
        with pytest.raises(ValueError, match="non-negative"):
            c.shared_input((-1, 3))


@pytest.mark.parametrize("peer, local", [
    ("ipv4:127.0.0.1:50000", True), ("ipv4:127.8.9.1:1", True), ("ipv6:[::1]:50000", True),
    ("ipv6:[::ffff:127.0.0.1]:5", True), ("unix:/tmp/vis.sock", True), ("unix-abstract:vis", True),
    ("ipv4:10.0.0.5:50000", False), ("ipv6:[fe80::1]:5", False), ("ipv6:[::ffff:10.0.0.5]:5", False), ("", False),
])
def test_local_peers(peer, local):
    from vis_service.api.shared_memory import is_local_peer

    assert is_local_peer(peer) is local


def _non_loopback_address() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))   # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_shared_memory_from_another_address_is_permission_denied(x, region):
    """A region is a file on the server's host: a call not through loopback may not name one (it
    could only be another client's, which the results would overwrite)."""
    from vis_service.api.servicers import Limits
    from vis_service.default_models import DEFAULT_REPOSITORY
    from vis_service.gen import vis_pb2_grpc
    from vis_service.server import ServerConfig, start_server

    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call the server through")
    running = start_server(ServerConfig(host="0.0.0.0", port=0, model_repository=DEFAULT_REPOSITORY, limits=Limits()))
    try:
        with grpc.insecure_channel(f"{address}:{running.port}") as channel:
            vis = vis_pb2_grpc.VisServiceStub(channel)
            request = vis_pb2.ActivationsRequest(model="digits", input=vis_pb2.InputBatch(
                tensors=[tensor_to_proto("", x)]))
            with pytest.raises(grpc.RpcError) as e:
                list(vis.Activations(request, metadata=metadata_of(region, region.size)))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "shared memory is for clients on the server's host" in e.value.details()
            assert len(list(vis.Activations(request))) > 0   # the same call without the region works
    finally:
        running.stop(grace=0)
