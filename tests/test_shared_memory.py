"""Same-host shared memory for result tensors (vis-shm-* metadata, TensorChunk.in_shared_memory)."""
from __future__ import annotations

import secrets
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from vis_client import Client
from vis_client.tensors import ChunkAssembler
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
    return np.random.default_rng(3).standard_normal((6, 1, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def shm_client(server):
    with Client(server.address, shared_memory_bytes=8 << 20) as c:
        yield c


@pytest.fixture()
def region():
    """A region made as the client makes it, for raw-stub calls."""
    shm = shared_memory.SharedMemory(name=f"vis_test_{secrets.token_hex(6)}", create=True, size=8 << 20)
    yield shm
    shm.close()
    shm.unlink()


def raw_activations(stubs, request, metadata, region_buf=None):
    """Drain a raw Activations stream: (chunks, tensors reassembled with the region)."""
    chunks = [m.tensor for m in stubs[1].Activations(request, metadata=metadata) if m.HasField("tensor")]
    assembler = ChunkAssembler(region_buf)
    tensors = dict(filter(None, (assembler.add(c) for c in chunks)))
    assembler.finish()
    return chunks, tensors


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k  # bit for bit


def test_results_through_shared_memory_equal_streamed(client, shm_client, digits, x):
    layers = digits_layers()
    assert len(layers) >= 3
    assert_same(shm_client.activations(digits.id, x, layers), client.activations(digits, x, layers))
    g_shm, g = shm_client.gradient(digits.id, x, 3), client.gradient(digits, x, 3)
    assert_same(g_shm.result.tensors, g.result.tensors)
    assert g_shm.labels == g.labels
    a_shm = shm_client.integrated_gradients(digits.id, x[:2], None, steps=8)
    a = client.integrated_gradients(digits, x[:2], None, steps=8)  # the run_streaming path
    assert_same(a_shm.result.tensors, a.result.tensors)
    assert a_shm.result.scalars == a.result.scalars
    conv = next(n.name for n in client.inspect(digits).nodes if n.op_type == "Conv")
    assert_same(shm_client.filters(digits.id, conv), client.filters(digits, conv))
    # the results are the client's own arrays, not views of the region it reuses
    acts = shm_client.activations(digits.id, x, layers[:1])
    assert acts[layers[0]].flags.owndata and acts[layers[0]].flags.writeable


def test_server_writes_into_the_region_and_streams_what_does_not_fit(client, stubs, digits, x, region):
    layers = digits_layers()
    request = vis_pb2.ActivationsRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[tensor_to_proto("", x)]),
                                         layers=layers)
    expected = client.activations(digits, x, layers)
    sizes = [expected[n].nbytes for n in layers]
    # room for the first tensor (and maybe small ones), not for all: the rest is streamed
    declared = sizes[0] + 64
    assert sum(sizes) > declared
    chunks, got = raw_activations(stubs, request, (("vis-shm-name", region.name), ("vis-shm-size", str(declared))),
                                  region.buf[:declared])
    assert_same(got, expected)
    placed = [c for c in chunks if c.in_shared_memory]
    assert placed[0].name == layers[0] and placed[0].shm_offset == 0 and not placed[0].data
    assert all(c.shm_offset + c.total_bytes <= declared for c in placed)
    assert any(not c.in_shared_memory and c.data for c in chunks)  # fallback
    # the whole region: every tensor placed, none streamed
    chunks, got = raw_activations(stubs, request, (("vis-shm-name", region.name), ("vis-shm-size", str(region.size))),
                                  region.buf)
    assert_same(got, expected)
    assert sum(sizes) <= region.size and all(c.in_shared_memory and not c.data for c in chunks)


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
    assert client.activations(digits, x, ["logits"])["logits"].shape == (6, 10)  # still serving


def test_declared_size_larger_than_the_region(stubs, client, digits, x, region):
    request = vis_pb2.GradientRequest(model=digits.id, input=vis_pb2.InputBatch(tensors=[tensor_to_proto("", x)]))
    metadata = (("vis-shm-name", region.name), ("vis-shm-size", str(region.size + 4096)))
    with pytest.raises(grpc.RpcError) as e:
        list(stubs[1].Gradient(request, metadata=metadata))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vis-shm-size" in e.value.details() and str(region.size) in e.value.details()
    assert (SHM / region.name).exists()  # the server never deletes a region
    assert client.gradient(digits, x, 1).gradient.shape == x.shape


def test_concurrent_calls_on_one_client_and_close_unlinks(server, client, digits, x):
    from concurrent.futures import ThreadPoolExecutor

    layers = digits_layers()
    expected = client.activations(digits, x, layers)
    c = Client(server.address, shared_memory_bytes=8 << 20)
    path = SHM / c._shared.name
    assert path.exists()
    with ThreadPoolExecutor(4) as pool:  # one call uses the region, the others are streamed
        for got in pool.map(lambda _: c.activations(digits.id, x, layers), range(8)):
            assert_same(got, expected)
    c.close()
    assert not path.exists()


def test_failed_call_retires_the_region(server, client, digits, x):
    with Client(server.address, shared_memory_bytes=8 << 20) as c:
        first = c._shared.name
        with pytest.raises(Exception):
            c.activations(digits.id, x, ["no_such_layer"])
        assert not (SHM / first).exists()  # replaced: the server may have been writing into it
        assert_same(c.activations(digits.id, x, ["logits"]), client.activations(digits, x, ["logits"]))
        assert c._shared.name != first and (SHM / c._shared.name).exists()
