"""Client request building and argument checks (no server needed; the end-to-end
behaviour against the real server is in tests/test_api_*.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import vis_client  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from vis_client import Client, Target
from vis_client.client import build_input_batch, build_preprocessing, build_target
from vis_client.gen import vis_pb2


@pytest.fixture
def client():
    """A client whose channel is never used: validation happens before any call."""
    with Client("127.0.0.1:9") as c:
        yield c


def test_argument_validation(client):
    """Client-side checks fail before any call is made."""
    with pytest.raises(ValueError, match="cotangent"):
        build_target("conv1")
    with pytest.raises(TypeError):
        build_target(1.5)
    with pytest.raises(TypeError):
        Target.output(True)
    with pytest.raises(ValueError, match="preset"):
        build_preprocessing("bogus")
    with pytest.raises(ValueError):
        build_preprocessing({"layout": 5, "nope": 1})
    with pytest.raises(ValueError):
        build_input_batch([])
    with pytest.raises(TypeError, match="ambiguous"):
        build_input_batch([np.zeros((3, 8, 8))])
    with pytest.raises(TypeError):
        client.activations(42, np.zeros((1, 3, 8, 8)), ["c1"])
    with pytest.raises(TypeError):
        client.filters("tiny", "")


def test_request_builders():
    assert build_target(None) == vis_pb2.Target(output=vis_pb2.OutputTarget())
    assert list(build_target(np.int64(4)).output.index) == [4]
    assert build_target(Target.channel("c1", [1, 2])).channel.channel == [1, 2]
    assert Target.neuron("c1", 1, 2, 3).neuron.x == 3
    assert Target.output(5, output="logits").output.output == "logits"
    p = build_preprocessing({"preset": "tf", "layout": "NHWC", "size": [96, 96], "mean": [0.5, 0.5, 0.5]})
    assert p.preset == "tf" and p.config.layout == "NHWC" and list(p.config.size) == [96, 96]
    b = build_input_batch({"a": np.zeros((1, 2), np.int64), "b": np.ones((1, 3))})
    assert [(t.name, t.datatype) for t in b.tensors] == [("a", "INT64"), ("b", "FP32")]
    PIL = pytest.importorskip("PIL.Image")
    b = build_input_batch(PIL.new("RGB", (4, 4)))
    assert b.images[0][:8] == b"\x89PNG\r\n\x1a\n"
