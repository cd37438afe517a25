"""Cancellation ends the onnxruntime run in flight, runs in flight are bounded, and the server's
flags are checked before it starts (what an exploratory session found: cancelled calls kept
running and their runs piled up until the server was killed for memory)."""
from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from vis_client import Cancelled, Client, Target
from vis_client.errors import ResourceExhausted
from vis_service.api.servicers import Limits
from vis_service.server import ServerConfig, start_server


def heavy_model(size: int = 128, channels: int = 32, layers: int = 4) -> bytes:
    """A conv stack whose 64-row forward+gradient run takes seconds on two cores (each kernel a
    fraction of that): long enough to be cancelled in the middle."""
    rng = np.random.default_rng(0)
    inits, nodes, prev, cin = [], [], "x", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev, cin = f"r{i}", channels
    inits.append(numpy_helper.from_array(rng.standard_normal((channels, 10)).astype(np.float32), "fc"))
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("MatMul", ["flat", "fc"], ["logits"], name="fc")]
    g = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, size, size])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


@pytest.fixture(scope="module")
def heavy(client):
    model = client.load_model(heavy_model(), name="heavy-convs")
    yield model
    client.unload(model.id)


def _cancel_once_in_flight(server, call) -> tuple[BaseException | None, float]:
    """Run `call(cancel_event)` in a thread, cancel as soon as one of its runs is in flight;
    returns (what the call raised, seconds until no run was in flight any more)."""
    gate = server.state.runtime.gate
    cancel, outcome = threading.Event(), {}

    def target():
        try:
            call(cancel)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    worker = threading.Thread(target=target)
    worker.start()
    deadline = time.monotonic() + 60
    while gate.in_flight == 0 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert gate.in_flight >= 1, "the call never had a run in flight"
    cancel.set()
    cancelled_at = time.monotonic()
    worker.join(60)
    while gate.in_flight and time.monotonic() < deadline:
        time.sleep(0.005)
    return outcome.get("error"), time.monotonic() - cancelled_at


@pytest.mark.parametrize("method", ["smoothgrad", "activations", "gradient"])
def test_cancel_ends_the_run_in_flight(server, client, heavy, method):
    """The cancelled request's onnxruntime run is terminated (RunOptions.terminate), not waited for;
    SmoothGrad's loop runs in a worker thread, activations and gradient on the handler's."""
    x = np.random.default_rng(1).standard_normal((64, 3, 128, 128)).astype(np.float32)
    calls = {
        "smoothgrad": lambda ev: client.smoothgrad(heavy, x[:1], Target.output(0), samples=64, batch=64, cancel=ev),
        "activations": lambda ev: client.activations(heavy, x, ["logits"], cancel=ev),
        "gradient": lambda ev: client.gradient(heavy, x, Target.output(0), cancel=ev),
    }
    gate = server.state.runtime.gate
    terminated = gate.terminated
    error, _ = _cancel_once_in_flight(server, calls[method])
    assert isinstance(error, Cancelled), error
    assert gate.in_flight == 0
    assert gate.terminated == terminated + 1     # ended by the cancellation, not run to its end
    assert client.activations(heavy, x[:2], ["logits"])["logits"].shape == (2, 10)   # still serving


def test_runs_in_flight_are_bounded(heavy):
    """With --max-concurrent-runs 1, four concurrent gradient calls run one at a time and give
    the same results as one after another."""
    running = start_server(ServerConfig(port=0, model_repository=None, max_concurrent_runs=1))
    try:
        with Client(running.address) as c:
            m = c.load_model(heavy_model(size=48), name="heavy-small")
            xs = [np.random.default_rng(k).standard_normal((4, 3, 48, 48)).astype(np.float32) for k in range(4)]
            expected = [c.gradient(m, x, Target.output(3)).gradients["input"] for x in xs]
            results = [None] * 4

            def call(k):
                results[k] = c.gradient(m, xs[k], Target.output(3)).gradients["input"]

            threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            for got, want in zip(results, expected):
                np.testing.assert_array_equal(got, want)
            assert running.state.runtime.gate.most_in_flight == 1
    finally:
        running.stop(grace=0)


def endless_model() -> bytes:
    """A small conv net whose logits add the result of a Loop of 10^12 trips over the input's sum:
    a 1 KB graph whose run never ends."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", onnx.TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", onnx.TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["logits0"], name="flatten"),
             helper.make_node("ReduceSum", ["x"], ["start"], keepdims=0, name="sum"),
             helper.make_node("Loop", ["trips", "", "start"], ["count"], body=body, name="endless"),
             helper.make_node("Add", ["logits0", "count"], ["logits"], name="add")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(10 ** 12, np.int64), "trips")]
    g = helper.make_graph(nodes, "endless", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def test_a_run_past_the_servers_time_limit_is_ended():
    """--max-run-seconds: a run that never ends is stopped at the limit, RESOURCE_EXHAUSTED naming the
    flag, and frees its run slot (it held the only one until the client gave up); calls after it are
    served; GetServerInfo reports the limit."""
    running = start_server(ServerConfig(port=0, model_repository=None, max_concurrent_runs=1, max_run_seconds=1.0))
    try:
        with Client(running.address, timeout=30) as c:   # without the limit: DEADLINE_EXCEEDED, not a hang
            assert c.server_info()["max_run_seconds"] == 1.0
            m = c.load_model(endless_model(), name="endless")
            x = np.ones((1, 3, 8, 8), np.float32)
            started = time.monotonic()
            with pytest.raises(ResourceExhausted) as e:
                c.activations(m, x, ["logits"])
            assert time.monotonic() - started < 15
            assert "longer than the server's limit of 1 s per run (--max-run-seconds)" in str(e.value)
            assert running.state.runtime.gate.in_flight == 0
            other = c.load_model(heavy_model(size=16, channels=4, layers=1), name="quick")
            assert c.activations(other, np.ones((1, 3, 16, 16), np.float32), ["logits"])["logits"].shape == (1, 10)
            with pytest.raises(ResourceExhausted):   # each call gets the whole limit again
                c.activations(m, x, ["logits"])
    finally:
        running.stop(grace=0)


def test_a_callback_that_raises_cancels_the_call():
    """An on_step / on_progress callback that raises (or Ctrl-C in it) reached the caller, but the
    server went on with the call while the exception, and with it the call, was alive (a REPL keeps
    it): a 100000-step loop held the server's only work slot."""
    from vis_client.errors import VisError
    from vis_client.optimization import Objective
    from vis_service.default_models import DEFAULT_MODEL_DIR

    running = start_server(ServerConfig(port=0, model_repository=None, workers=1))
    try:
        with Client(running.address) as c:
            m = c.load_model(DEFAULT_MODEL_DIR / "model.onnx", name="digits-callback")

            def stop_at_step_3(progress):
                if progress.done == 3:
                    raise RuntimeError("callback failed")

            with pytest.raises(RuntimeError) as kept:   # `kept` holds the exception, as a REPL would
                c.maximize(m, [Objective.channel("conv3", 1)], steps=100000, on_step=stop_at_step_3)
            deadline = time.monotonic() + 20
            while True:   # the only work slot is free again once the loop has stopped
                try:
                    c.activations(m, np.zeros((1, 1, 32, 32), np.float32), ["logits"])
                    break
                except VisError:
                    assert time.monotonic() < deadline, "the loop of the failed call still holds the work slot"
                    time.sleep(0.2)
            assert kept.value is not None
    finally:
        running.stop(grace=0)


def test_the_watchdog_expires_only_runs_still_in_flight_at_their_deadline():
    from vis_service.runtime.sessions import RunControl, RunWatchdog

    watchdog = RunWatchdog(0.3)
    done, late = RunControl(), RunControl()
    watchdog.unwatch(watchdog.watch(done))
    token = watchdog.watch(late)
    time.sleep(1.0)
    assert done.expired is None and not done.options.terminate
    assert "limit of 0.3 s per run (--max-run-seconds)" in late.expired and late.options.terminate
    watchdog.unwatch(token)
    years = RunWatchdog(1e300)   # a wait that long overflowed the lock's timeout in the watchdog's thread
    token = years.watch(RunControl())
    time.sleep(0.2)
    assert years._thread.is_alive()
    years.unwatch(token)


def test_a_run_that_ends_as_the_watchdog_fires_keeps_its_result():
    """The watchdog can fire between a run's return and its unwatch: that run's result stands and
    the request's later runs go on (its RunControl is cleared), unlike a run it really ended."""
    from vis_service.runtime.sessions import RunControl, RunGate, Session

    class RacingWatchdog:   # fires exactly at the worst moment: after the run, before unwatch
        def __init__(self):
            self.control = None

        def watch(self, control):
            self.control = control
            return 0

        def unwatch(self, token):
            self.control.expire("late")

    gate = RunGate(1)
    gate.watchdog = RacingWatchdog()
    session = Session(key=("k",), model=onnx.ModelProto(), ort_session=None, gate=gate)
    control = RunControl()
    with control.bound():
        assert session._controlled(lambda options: "result") == "result"
        assert control.expired is None and not control.options.terminate
        assert session._controlled(lambda options: "again") == "again"


@pytest.mark.parametrize("flags,fragment", [
    (["--chunk-mb", "0"], "--chunk-mb must be in 1 KiB .. 64 MiB, got 0 MiB"),
    (["--max-request-mb", "1"], "--max-request-mb must be in 2 MiB (uploads stream 1 MiB chunks) .. 2047 MiB "
                                "(gRPC's largest message), got 1 MiB"),
    (["--max-request-mb", "2048"], "--max-request-mb must be in 2 MiB"),
    (["--chunk-mb", "inf"], "argument --chunk-mb: must be a finite size in MiB, got 'inf'"),
    (["--max-upload-mb", "nan"], "argument --max-upload-mb: must be a finite size in MiB, got 'nan'"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--port", "70000"], "--port must be 0..65535"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-upload-mb", "-5"], "--max-upload-mb must be > 0"),
    (["--session-cache", "-1"], "--session-cache must be >= 1"),
    (["--session-cache-mb", "-5"], "--session-cache-mb must be >= 0 MiB (0 = 40% of the physical memory), got -5 MiB"),
    (["--max-concurrent-runs", "-1"], "--max-concurrent-runs must be >= 0"),
    (["--max-run-seconds", "-1"], "--max-run-seconds must be a finite number >= 0 (0 = no limit), got -1.0"),
    (["--max-run-seconds", "nan"], "--max-run-seconds must be a finite number >= 0 (0 = no limit), got nan"),
    (["--max-run-seconds", "inf"], "--max-run-seconds must be a finite number >= 0 (0 = no limit), got inf"),
    (["--model-repository", "/nonexistent/repository"], "--model-repository '/nonexistent/repository' is not a directory"),
    (["--log-level", "BOGUS"], "invalid choice"),
    (["--preload", "digits", "digitz"], "--preload: no repository model named 'digitz'; the repository holds: digits"),
])
def test_server_flags_are_checked_before_starting(flags, fragment, capsys):
    """A bad flag is a usage error of the serve command naming the flag (not the setting behind it)."""
    from vis_service import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--port", "0"] + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert "usage: vis-service serve" in err


def test_a_port_in_use_is_named_as_such(capsys):
    """grpc's 'Failed to bind to address ...; set GRPC_VERBOSITY=debug' did not say why."""
    import socket

    from vis_service import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", "--port", str(port), "--preload"])
    assert e.value.code == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use, or the host is not an address" in capsys.readouterr().err


def test_repository_without_models_is_reported(tmp_path, caplog):
    """A repository whose entries are not <name>/model.onnx serves nothing: the log says so and why."""
    from vis_service import cli
    from vis_service.models.store import ModelStore
    from vis_service.runtime.sessions import Runtime

    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "squeezenet.onnx").write_bytes(b"")
    (tmp_path / "loose.onnx").write_bytes(b"")
    (tmp_path / "README.md").write_text("models of the team")
    (tmp_path / "__pycache__").mkdir()
    store = ModelStore(Runtime(provider="cpu"), tmp_path)
    with caplog.at_level("WARNING", logger="vis_service"):
        cli._repository_warnings(store, tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignored imagenet (no model.onnx in it, or not yet), loose.onnx (a file, not <name>/model.onnx)" in m
               for m in messages), messages
    assert any("holds no models" in m for m in messages), messages
    caplog.clear()
    (tmp_path / "imagenet" / "model.onnx").write_bytes(b"")
    (tmp_path / "loose.onnx").unlink()
    with caplog.at_level("WARNING", logger="vis_service"):
        cli._repository_warnings(store, tmp_path)
    assert not caplog.records
    (tmp_path / "res net").mkdir()
    (tmp_path / "res net" / "model.onnx").write_bytes(b"")
    with caplog.at_level("WARNING", logger="vis_service"):
        cli._repository_warnings(store, tmp_path)
    assert "ignored res net (its name has other characters)" in caplog.records[0].getMessage()


def test_limits_values():
    with pytest.raises(ValueError, match="chunk_bytes"):
        Limits(chunk_bytes=0)
    assert Limits(chunk_bytes=64 << 20).chunk_bytes == 64 << 20


def test_a_deadline_that_passes_while_images_are_decoded_stops_the_method():
    """The call ends while the server still decodes its 96 images: gRPC then refuses the
    cancellation callback (add_callback is False), which was ignored, so IG ran for nobody and
    held the only work slot; now the method never starts."""
    import io

    from PIL import Image

    from vis_client.errors import DeadlineExceeded
    from vis_service.default_models import DEFAULT_REPOSITORY

    rng = np.random.default_rng(0)

    def png():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    images = [png() for _ in range(96)]
    running = start_server(ServerConfig(port=0, model_repository=DEFAULT_REPOSITORY, workers=1))
    try:
        with Client(running.address, timeout=0.3) as c:
            with pytest.raises(DeadlineExceeded):
                c.integrated_gradients("digits", images, steps=200)
        time.sleep(1.0)
        assert running.state.runtime.gate.most_in_flight == 0   # no onnxruntime run was started
        with Client(running.address) as c:   # and the slot is free
            assert c.gradient("digits", np.zeros((1, 1, 32, 32), np.float32)).gradient.shape == (1, 1, 32, 32)
    finally:
        running.stop(grace=0)


def test_an_upload_past_its_deadline_is_not_registered():
    """The client was told DEADLINE_EXCEEDED while the server still prepared the model: the model
    used to appear as loaded anyway (and its preparation ran to the end)."""
    from _graph_helpers import LIGHT_DIR
    from vis_client.errors import DeadlineExceeded

    data = (LIGHT_DIR / "light_resnet50.onnx").read_bytes()   # ~1 s to parse, prepare and load
    running = start_server(ServerConfig(port=0, model_repository=None))
    try:
        with Client(running.address, timeout=0.2) as c:
            with pytest.raises(DeadlineExceeded):
                c.load_model(data, name="late")
        time.sleep(2.5)
        assert not running.state.store.loaded()
        with Client(running.address) as c:
            assert c.load_model(data, name="late").names == ["late"]   # with time to finish, it loads
    finally:
        running.stop(grace=0)


def test_a_call_waiting_for_another_calls_session_build_stops_when_cancelled():
    """Two calls needing the same new session: the second waits for the first's build (one build,
    not two). Cancelled meanwhile, it waited to the build's end (14 s for a 3000-layer backward
    graph) holding its work slot; it now stops within a poll."""
    from vis_service.errors import Cancelled as ServerCancelled
    from vis_service.runtime.sessions import RunControl, Runtime

    runtime = Runtime(provider="cpu")
    building, release = threading.Event(), threading.Event()
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)

    def slow_build():
        building.set()
        release.wait(30)
        return model, None

    first = threading.Thread(target=lambda: runtime.session("m", ("k",), slow_build))
    first.start()
    assert building.wait(30)
    control, outcome = RunControl(), []

    def second():
        with control.bound():
            try:
                runtime.session("m", ("k",), slow_build)
                outcome.append("built")
            except ServerCancelled:
                outcome.append("cancelled")

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.3)
    control.cancel()
    waiter.join(10)
    assert outcome == ["cancelled"] and not release.is_set()   # while the first build still runs
    release.set()
    first.join(30)
    assert runtime.session("m", ("k",), slow_build).output_names == ["y"]   # the first build was cached
