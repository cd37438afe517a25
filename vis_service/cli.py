"""`vis-service serve ...` / `python -m vis_service serve ...`."""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from .api.servicers import Limits
from .default_models import DEFAULT_REPOSITORY
from .models.store import MODEL_FILE
from .server import ServerConfig, start_server

MB = 1 << 20


def mebibytes(text: str) -> int:
    """argparse type: a size in MiB (a float) -> bytes; finite, or argparse says which flag."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size in MiB: {text!r}") from None
    if not math.isfinite(value) or abs(value) > 1 << 40:
        raise argparse.ArgumentTypeError(f"must be a finite size in MiB, got {text!r}")
    return int(value * MB)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vis-service", description="gRPC service that shows what ONNX CNNs have learned")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    ap.set_defaults(commands=sub.choices)   # main reports a stray argument with its command's usage
    defaults = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("serve", help="run the gRPC server", description="Run the gRPC server.", formatter_class=defaults)
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=50051, help="0 picks a free port and prints it")
    s.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="directory of <name>/model.onnx (+ config.json|config.pbtxt, labels.txt); "
                        "the default holds the embedded models")
    s.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="execution provider; auto = CUDA when a CUDA session really works")
    s.add_argument("--workers", type=int, default=8,
                   help="calls doing work at once (uploads, loads, methods); one more waits up to a second for a slot, "
                        "then is answered RESOURCE_EXHAUSTED. "
                        "Health checks, List, Inspect, Unload and GetServerInfo are always answered")
    s.add_argument("--max-concurrent-runs", type=int, default=2,
                   help="onnxruntime runs at once, the others wait (each holds its graph's tensors; 0 = no bound)")
    s.add_argument("--session-cache", type=int, default=32, help="onnxruntime sessions kept (LRU)")
    s.add_argument("--session-cache-mb", type=mebibytes, default="0",
                   help="memory the kept sessions' weights take, summed (LRU; estimated: a session holds its "
                        "model's weights about twice, a backward graph three times); 0 = 40%% of the physical memory")
    s.add_argument("--max-loaded-mb", type=mebibytes, default="0",
                   help="model files loaded at once, summed (each keeps its parsed graph, ~2x its size); a model "
                        "past it is RESOURCE_EXHAUSTED until others are unloaded; 0 = a quarter of the physical memory")
    s.add_argument("--max-run-mb", type=mebibytes, default="0",
                   help="memory onnxruntime's runs may take at once, summed (its shared CPU memory arena; a run or "
                        "a session build that needs more is RESOURCE_EXHAUSTED); 0 = half the physical memory")
    s.add_argument("--max-run-seconds", type=float, default=600.0,
                   help="longest one onnxruntime run may last; a longer one is ended, RESOURCE_EXHAUSTED (a graph "
                        "that never ends held its run slot until the client gave up); 0 = no limit")
    s.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = all cores)")
    s.add_argument("--chunk-mb", type=mebibytes, default="1", help="largest tensor payload per streamed message")
    s.add_argument("--max-upload-mb", type=mebibytes, default="1024",
                   help="largest model accepted, uploaded or from the repository, external data included")
    s.add_argument("--max-request-mb", type=mebibytes, default="64", help="largest request message (2 .. 2047)")
    s.add_argument("--max-batch", type=int, default=256, help="images per request and rows per onnxruntime run")
    s.add_argument("--preload", nargs="*", default=None, metavar="NAME",
                   help="repository models to load at start (not given: all; a bare --preload: none)")
    s.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), help="server log level")
    s.set_defaults(usage_error=s.error)   # a bad value shows the serve command's usage
    h = sub.add_parser("health", help="ask a running server's gRPC health service; exit 0 when SERVING",
                       description="Ask a running server's gRPC health service; exit 0 when SERVING.",
                       formatter_class=defaults)
    h.add_argument("--address", default=os.environ.get("VIS_ADDRESS", "127.0.0.1:50051"),
                   help="server host:port (env VIS_ADDRESS)")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    return ap


# settings checked by ServerConfig / Limits -> the flag that sets them, for usage errors
FLAGS = {"max_request_bytes": "--max-request-mb", "chunk_bytes": "--chunk-mb", "max_upload_bytes": "--max-upload-mb",
         "max_batch": "--max-batch", "port": "--port", "workers": "--workers", "session cache size": "--session-cache",
         "intra-op threads": "--threads", "max concurrent runs": "--max-concurrent-runs",
         "model repository": "--model-repository", "session cache bytes": "--session-cache-mb",
         "run memory bytes": "--max-run-mb", "loaded model bytes": "--max-loaded-mb",
         "max run seconds": "--max-run-seconds"}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("vis-service")
    except Exception:  # noqa: BLE001 - a source checkout that is not installed
        return "unknown"


def _serve_usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exit with the serve command's usage and `message`, naming the flag rather than the setting."""
    for setting, flag in FLAGS.items():
        if message.startswith(setting + " "):
            message = flag + message[len(setting):]
            break
    args.usage_error(message)
    raise AssertionError("unreachable: argparse's error exits")


def _why_ignored(entry: Path) -> str:
    if not entry.is_dir():
        return " (a file, not <name>/model.onnx)"
    if not (entry / MODEL_FILE).is_file():
        return f" (no {MODEL_FILE} in it, or not yet)"
    return " (its name has other characters)"


def _repository_warnings(store, repository: Path | None) -> None:
    """Say what a repository holds that is not a model: an empty or mislaid repository would
    otherwise serve nothing without a word (a model is <name>/model.onnx)."""
    if repository is None:
        return
    log = logging.getLogger("vis_service")
    names = store.repository_names()
    # directories that are not models, and models lying loose (other files, e.g. a README, are fine)
    ignored = sorted((p for p in repository.iterdir()
                      if p.name not in names and not p.name.startswith((".", "__"))
                      and (p.is_dir() or p.suffix.lower() == ".onnx")), key=lambda p: p.name)
    if ignored:
        log.warning("model repository %s: ignored %s (a model is <name>/model.onnx, name of letters, digits, "
                    "'.', '_', '-')", repository, ", ".join(p.name + _why_ignored(p) for p in ignored))
    if not names:
        log.warning("model repository %s holds no models; uploads still work", repository)


def health_check(address: str, timeout: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:   # a typo'd flag is a usage error of its command (the top-level usage lists only commands)
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "health":
        return health_check(args.address, args.timeout)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:   # every value is checked before anything starts: a bad one is a usage error, not a traceback
        limits = Limits(chunk_bytes=args.chunk_mb, max_upload_bytes=args.max_upload_mb,
                        max_request_bytes=args.max_request_mb, max_batch=args.max_batch)
        cfg = ServerConfig(args.host, args.port, args.model_repository, args.provider, args.workers,
                           args.session_cache, args.threads, limits, args.max_concurrent_runs,
                           args.session_cache_mb, args.max_run_mb, args.max_loaded_mb, args.max_run_seconds)
        running = start_server(cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        _serve_usage_error(args, str(exc))
    store = running.state.store
    _repository_warnings(store, store.repository)
    names = store.repository_names() if args.preload is None else args.preload
    unknown = [n for n in names if n not in store.repository_names()]
    if unknown:
        running.stop(grace=0)
        _serve_usage_error(args, f"--preload: no repository model named {', '.join(map(repr, unknown))}; the repository "
                           f"holds: {', '.join(store.repository_names()) or 'none'}")
    for name in names:
        try:
            running.state.store.load(name)
        except Exception as exc:  # noqa: BLE001 - a bad repository entry must not stop the server
            logging.getLogger("vis_service").warning("could not preload %s: %s", name, exc)
    print(f"vis-service listening on {running.address} (provider {running.state.runtime.provider})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop(grace=2.0)
    return 0
