"""`vis-service serve ...` / `python -m vis_service serve ...`."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .api.servicers import Limits
from .default_models import DEFAULT_REPOSITORY
from .server import ServerConfig, start_server

MB = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vis-service", description="gRPC service that shows what ONNX CNNs have learned")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051, help="0 picks a free port and prints it")
    s.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="directory of <name>/model.onnx (+ config.json|config.pbtxt, labels); default: the embedded models")
    s.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="execution provider; auto = CUDA when a CUDA session really works")
    s.add_argument("--workers", type=int, default=8, help="concurrent RPCs")
    s.add_argument("--max-concurrent-runs", type=int, default=2,
                   help="onnxruntime runs at once, the others wait (each holds its graph's tensors; 0 = no bound)")
    s.add_argument("--session-cache", type=int, default=32, help="onnxruntime sessions kept (LRU)")
    s.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = all cores)")
    s.add_argument("--chunk-mb", type=float, default=1.0, help="largest tensor payload per streamed message")
    s.add_argument("--max-upload-mb", type=float, default=1024.0,
                   help="largest model accepted, uploaded or from the repository, external data included")
    s.add_argument("--max-request-mb", type=float, default=64.0, help="largest request message (at least 2)")
    s.add_argument("--max-batch", type=int, default=256, help="images per request and rows per onnxruntime run")
    s.add_argument("--preload", nargs="*", default=None, help="repository models to load at start (default: all)")
    s.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    h = sub.add_parser("health", help="ask a running server's gRPC health service; exit 0 when SERVING")
    h.add_argument("--address", default="127.0.0.1:50051")
    h.add_argument("--timeout", type=float, default=3.0)
    return ap


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
    args = build_parser().parse_args(argv)
    if args.command == "health":
        return health_check(args.address, args.timeout)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:   # every value is checked before anything starts: a bad one is a usage error, not a traceback
        limits = Limits(chunk_bytes=int(args.chunk_mb * MB), max_upload_bytes=int(args.max_upload_mb * MB),
                        max_request_bytes=int(args.max_request_mb * MB), max_batch=args.max_batch)
        cfg = ServerConfig(args.host, args.port, args.model_repository, args.provider, args.workers,
                           args.session_cache, args.threads, limits, args.max_concurrent_runs)
        running = start_server(cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        build_parser().error(str(exc))
    names = running.state.store.repository_names() if args.preload is None else args.preload
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
