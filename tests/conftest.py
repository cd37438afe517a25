"""Shared fixtures: a real gRPC server on a localhost port over a temporary model repository."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from vis_service.api.servicers import Limits
from vis_service.default_models import DEFAULT_MODEL_DIR
from vis_service.server import ServerConfig, start_server

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODELS = SHARED / "models"
SHARED_IMAGES = SHARED / "data" / "images"
SHARED_LABELS = SHARED / "data" / "labels"
SKIP_NO_SHARED = "../shared (trained models and photos) is not beside the project"

# Repository entries made from ../shared: (name, model file, config)
SHARED_REPO = {
    "squeezenet": ("imagenet/squeezenet1.0.onnx", {"preset": "caffe", "labels": "labels.txt"}, "imagenet1000_synset_words.txt"),
    # ../shared/README.md: RGB, (x - 128) / 128, centre square crop -> 192
    "mobilenet": ("imagenet/mobilenet_v1_0.75_192.onnx",
                  {"labels": "labels.txt", "input": {"color": "RGB", "value_range": [0, 255], "mean": [128, 128, 128],
                                                     "std": [128, 128, 128], "resize_short_side": 192}},
                  "imagenet1001_with_background_tf.txt"),
    "resnet20": ("cifar10/resnet20.onnx", {"preset": "imagenet", "labels": "labels.txt"}, "cifar10_labels.txt"),
    "mnist": ("mnist/mnist-8.onnx", {"preset": "raw255", "input": {"color": "GRAY", "resize": "stretch"}}, None),
}


def has_shared() -> bool:
    return SHARED_MODELS.is_dir()


requires_shared = pytest.mark.skipif(not has_shared(), reason=SKIP_NO_SHARED)


def light_model_paths() -> list[Path]:
    import onnx

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return sorted(light.glob("light_*.onnx"))


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    """A model repository: the embedded digits model, plus the shared models when present."""
    repo = tmp_path_factory.mktemp("repository")
    shutil.copytree(DEFAULT_MODEL_DIR, repo / "digits")
    if has_shared():
        for name, (rel, config, labels) in SHARED_REPO.items():
            d = repo / name
            d.mkdir()
            shutil.copyfile(SHARED_MODELS / rel, d / "model.onnx")
            (d / "config.json").write_text(json.dumps(config))
            if labels:
                lines = (SHARED_LABELS / labels).read_text().splitlines()
                # "n01440764 tench, Tinca tinca" -> "tench"
                names = [(ln.split(" ", 1)[1] if re.match(r"n\d{8} ", ln) else ln).split(",")[0] for ln in lines]
                (d / "labels.txt").write_text("\n".join(names) + "\n")
    return repo


@pytest.fixture(scope="session")
def server(repository):
    running = start_server(ServerConfig(port=0, model_repository=repository, workers=8,
                                        limits=Limits(chunk_bytes=256 * 1024, max_upload_bytes=64 << 20)))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="session")
def client(server):
    from vis_client import Client

    with Client(server.address) as c:
        yield c


@pytest.fixture(scope="session")
def digits(client):
    return client.model("digits")


@pytest.fixture(scope="session")
def digit_images() -> list[Path]:
    return sorted((DEFAULT_MODEL_DIR / "samples").glob("digit_*.png"))


@pytest.fixture(scope="session")
def stubs(server):
    """Raw gRPC stubs, for requests the Python client would refuse before sending."""
    import grpc

    from vis_service.gen import vis_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        yield vis_pb2_grpc.ModelServiceStub(ch), vis_pb2_grpc.VisServiceStub(ch)


@pytest.fixture
def every_cut(monkeypatch):
    """Cuts cost nothing in the planner's estimate: the small nets here take every cut that
    saves any multiply-add (by default a cut must save more than its Python overhead, which
    no net this small does), so occlusion tests go through the chains of cuts."""
    from vis_service.graph import local_head

    monkeypatch.setattr(local_head, "CUT_COST_MACS", 0)


def assert_status(exc_info, code, *fragments: str):
    """The VisError in `exc_info` has gRPC status `code` and each fragment in its details."""
    err = exc_info.value
    assert err.code == code, f"expected {code}, got {err.code}: {err.details}"
    for frag in fragments:
        assert frag in err.details, f"{frag!r} not in {err.details!r}"


def raw_status(server, stub_class, method: str, request) -> tuple:
    """(code, details) of the error a raw gRPC stub gets for `request` (the client checks some
    values itself; this asks the server directly). Streaming and unary methods alike."""
    import grpc

    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            reply = getattr(stub_class(channel), method)(request)
            list(reply) if hasattr(reply, "__iter__") else reply
    return e.value.code(), e.value.details()


def still_serving(client):
    """The server answers after an error (its info, and the embedded model)."""
    assert client.server_info()["provider"]
    assert client.model("digits").id
