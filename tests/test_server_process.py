"""`python -m vis_service serve` as a process: the free port it picks, prints and serves on; inputs
that would have killed it."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from vis_service.default_models import DEFAULT_REPOSITORY


def _serve(repository=DEFAULT_REPOSITORY, *flags: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "vis_service", "serve", "--port", "0", "--log-level", "WARNING",
         "--model-repository", str(repository), *flags],
        stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        process.terminate()
        pytest.fail(f"no address printed: {line!r}")
    return process, match.group(1)


def test_served_process_prints_its_port_and_serves():
    from vis_client import Client

    process, address = _serve()
    try:
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0  # --port 0: a real port
        with Client(address) as client:
            digits = client.model("digits")
            sample = sorted((DEFAULT_REPOSITORY / "digits" / "samples").glob("digit_*.png"))[:1]
            last = client.inspect(digits).nodes[-1].outputs[0]
            out = client.activations(digits, sample, [last])[last]
            assert out.shape[0] == 1 and np.isfinite(out).all()
    finally:
        process.terminate()
        process.wait(timeout=30)


def _free_size_net() -> bytes:
    """x [N, 3, H, W] -> Conv 3x3/2 (16) -> Relu -> MaxPool 3x3/2 ceil_mode -> Conv 1x1 (32) -> Relu ->
    GlobalAveragePool -> Flatten: at 3 x 3 or 4 x 4 the MaxPool's output is 0 x 0, and onnxruntime's
    blocked kernels after it divide by zero (SIGFPE: the process dies; a free-size SqueezeNet at 8 x 8)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], name="c1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, name="p1"),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], name="c2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flatten")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (16, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (32, 16, 1, 1)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_images_too_small_for_a_free_size_model_are_refused_and_the_process_lives(tmp_path):
    """Checked by shape inference at the images' size before any run: INVALID_ARGUMENT naming the
    empty tensor, for forward-only calls, gradients and maximize alike; the process keeps serving."""
    from vis_client import Client
    from vis_client.errors import InvalidArgument
    from vis_client.optimization import Objective

    process, address = _serve(tmp_path)
    try:
        with Client(address) as client:
            m = client.load_model(_free_size_net(), "free_size_net")
            small = np.ones((1, 3, 4, 4), np.float32)
            calls = [lambda: client.activations(m, small, ["logits"]), lambda: client.gradient(m, small),
                     lambda: client.grad_cam(m, small, layer="r1"),
                     lambda: client.maximize(m, [Objective.channel("r2", 0)], steps=1, preprocess={"size": [3, 3]})]
            for call in calls:
                with pytest.raises(InvalidArgument) as e:
                    call()
                assert "the input is too small for the model: with 'x' of shape ['N', 3, " in e.value.details
                assert "tensor 'p1' would have shape ['N', 16, 0, 0]; send larger images" in e.value.details
                assert process.poll() is None, "the server process died"
            assert client.activations(m, np.ones((1, 3, 5, 5), np.float32), ["logits"])["logits"].shape == (1, 32)
            assert client.gradient(m, np.ones((2, 3, 9, 6), np.float32)).gradient.shape == (2, 3, 9, 6)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _bomb(kind: str) -> bytes:
    """A tiny model with a side branch that makes one huge constant: `concat` doubles a 1-element
    tensor by Concat 30 times (2^30 floats, 4 GiB: onnxruntime folds it while it builds the session);
    `constant_of_shape` and `range` make 2^31 floats (8 GiB) from constants; the branch's sum is added to x."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones(1, np.float32), "c0")]
    nodes = []
    if kind == "concat":
        for i in range(30):
            nodes.append(helper.make_node("Concat", [f"c{i}", f"c{i}"], [f"c{i + 1}"], axis=0))
        big = "c30"
    elif kind == "constant_of_shape":
        inits.append(numpy_helper.from_array(np.array([1 << 31], np.int64), "shape"))
        nodes.append(helper.make_node("ConstantOfShape", ["shape"], ["big"],
                                      value=numpy_helper.from_array(np.ones(1, np.float32))))
        big = "big"
    else:
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("a", 0), ("b", 1 << 31), ("d", 1))]
        nodes.append(helper.make_node("Range", ["a", "b", "d"], ["big"]))
        big = "big"
    nodes += [helper.make_node("ReduceSum", [big], ["s"], keepdims=1), helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_that_makes_a_huge_constant_is_resource_exhausted():
    """A 2 KB upload whose constant folding took 64 GB killed the server during its upload; a 0.9 KB
    ConstantOfShape or Range of 12-20 GB on its first request (the kernel's OOM killer). onnxruntime's
    runs and session builds share one memory arena, bounded by --max-run-mb (default half the physical
    memory; 64 MiB here, against 4-8 GiB constants: onnxruntime's arena lets the folding take ~2.5 GiB
    before it refuses, the single allocations nothing)."""
    from vis_client import Client
    from vis_client.errors import ResourceExhausted

    process, address = _serve(DEFAULT_REPOSITORY, "--max-run-mb", "64")
    try:
        with Client(address) as client:
            assert client.server_info()["max_run_bytes"] == 64 << 20
            for kind in ("concat", "constant_of_shape", "range"):
                with pytest.raises(ResourceExhausted) as e:
                    model = client.load_model(_bomb(kind), f"bomb_{kind}")
                    client.activations(model, np.zeros((1, 4), np.float32), ["y"])  # where folding left it to the run
                assert "--max-run-mb" in e.value.details or "could not allocate" in e.value.details, e.value.details
            digits = client.model("digits")
            assert client.activations(digits, np.zeros((1, 1, 32, 32), np.float32), ["logits"])["logits"].shape == (1, 10)
    finally:
        process.terminate()
        process.wait(timeout=30)
