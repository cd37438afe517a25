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


def test_arguments_the_api_sweep_met_fail_before_the_call_naming_themselves(client, tmp_path):
    """Each of these reached protobuf or the wire as something else: '16' was a patch of (1, 6), 2**40
    steps were 'Value out of range' naming no field, 1.7 was channel 1, a Target given to maximize was
    "'Target' object is not iterable", a baseline tensor beside baseline='zero' was dropped, a
    directory was 'not found', a non-callable on_progress failed mid-stream."""
    from vis_client.optimization import Objective

    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(TypeError, match=r"patch must be an int or \[h, w\], got '16'"):
        client.occlusion("m", x, patch="16")
    with pytest.raises(ValueError, match="steps must be <= 2147483647"):
        client.maximize("m", Objective.channel("c", 0), steps=2 ** 40)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        client.maximize("m", Objective.channel("c", 0), seed=-1)
    with pytest.raises(ValueError, match="samples must be <= 2147483647"):
        client.smoothgrad("m", x, samples=2 ** 40)
    with pytest.raises(ValueError, match="index must be <= 9223372036854775807"):
        client.gradient("m", x, 2 ** 70)
    with pytest.raises(TypeError, match="channel must be an int, got 1.7"):
        Objective.channel("c", 1.7)
    with pytest.raises(TypeError, match="images must be an int, got 1.5"):
        Objective.channel("c", 1, images=1.5)
    with pytest.raises(TypeError, match="decorrelate must be a bool"):
        client.maximize("m", Objective.channel("c", 0), decorrelate="no")
    with pytest.raises(TypeError, match=r"Objective\.\* term .*Target\.\* is for the gradient"):
        client.maximize("m", Target.channel("c", 1))
    with pytest.raises(TypeError, match="wrt must be a name or a list of names"):
        client.gradient("m", x, wrt=5)
    with pytest.raises(ValueError, match="baseline_tensor is the 'custom' baseline"):
        client.integrated_gradients("m", x, baseline="zero", baseline_tensor=x)
    with pytest.raises(IsADirectoryError, match="got a directory"):
        client.activations("m", [str(tmp_path)], ["c"])
    with pytest.raises(IsADirectoryError, match="got a directory"):
        client.load_model(tmp_path)
    with pytest.raises(TypeError, match="on_progress must be callable"):
        client.smoothgrad("m", x, on_progress=5)
    with pytest.raises(TypeError, match="on_step must be callable"):
        client.maximize("m", Objective.channel("c", 0), on_step=5)


def test_a_closed_client_says_so_and_its_models_move_to_another():
    from vis_client.client import Model

    with Client("127.0.0.1:9") as first:
        pass
    with pytest.raises(ValueError, match=r"this Client \(127\.0\.0\.1:9\) is closed"):
        first.server_info()
    with pytest.raises(ValueError, match="is closed"):
        first.activations("m", np.zeros((1, 3, 8, 8), np.float32), ["c"])
    model = Model("sha256:0", ["m"], [], [], {}, 0, True, client=first)
    with Client("127.0.0.1:9") as second:
        assert second.model(model).client is second and model.client is first
