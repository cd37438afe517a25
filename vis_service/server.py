"""Assemble the gRPC server: servicers, health checking, reflection."""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api import attribution_servicer, localization_servicer, optimization_servicer
from .api.registration import WorkSlots, add_servicer
from .api.servicers import Limits, ModelServicer, ServiceState, VisServicer
from .gen import vis_pb2
from .models.store import ModelStore
from .runtime.providers import CUDA
from .methods.limits import physical_memory_bytes
from .runtime.sessions import Runtime

log = logging.getLogger(__name__)

# gRPC threads beyond --workers, for health checks and the light calls (List, Inspect, Unload,
# GetServerInfo), which take no work slot
LIGHT_THREADS = 4

SERVICE_NAMES = tuple(vis_pb2.DESCRIPTOR.services_by_name[n].full_name for n in ("ModelService", "VisService"))


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    model_repository: Path | None = None
    provider: str = "auto"
    workers: int = 8
    session_cache_size: int = 32
    intra_op_threads: int = 0
    limits: Limits = None  # type: ignore[assignment]
    max_concurrent_runs: int = 2   # onnxruntime runs at once (runtime.sessions.Runtime); 0 = no bound
    # weights of the cached sessions, bytes (runtime.sessions.Runtime); 0 = 40% of the physical memory
    session_cache_bytes: int = 0
    # what onnxruntime's runs take at once (its shared CPU arena), bytes; 0 = half the physical memory
    run_memory_bytes: int = 0
    # model files loaded at once, summed (models.store.ModelStore), bytes; 0 = a quarter of the physical memory
    loaded_model_bytes: int = 0
    # longest one onnxruntime run may last, seconds (runtime.sessions.RunWatchdog); 0 = no limit
    max_run_seconds: float = 600.0

    def __post_init__(self):
        if self.limits is None:
            self.limits = Limits()
        checks = [("port", self.port, 0, 65535), ("workers", self.workers, 1, None),
                  ("session cache size", self.session_cache_size, 1, None),
                  ("intra-op threads", self.intra_op_threads, 0, None),
                  ("max concurrent runs", self.max_concurrent_runs, 0, None)]
        for name, value, low, high in checks:
            if value < low or (high is not None and value > high):
                allowed = f"{low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be {allowed}, got {value}")
        if self.session_cache_bytes < 0:   # in MiB, the unit of its flag
            raise ValueError(f"session cache bytes must be >= 0 MiB (0 = 40% of the physical memory), got "
                             f"{self.session_cache_bytes / (1 << 20):g} MiB")
        if self.loaded_model_bytes < 0:
            raise ValueError(f"loaded model bytes must be >= 0 MiB (0 = a quarter of the physical memory), got "
                             f"{self.loaded_model_bytes / (1 << 20):g} MiB")
        if self.run_memory_bytes < 0:
            raise ValueError(f"run memory bytes must be >= 0 MiB (0 = half the physical memory), got "
                             f"{self.run_memory_bytes / (1 << 20):g} MiB")
        if not 0 <= self.max_run_seconds < float("inf"):   # NaN too
            raise ValueError(f"max run seconds must be a finite number >= 0 (0 = no limit), got {self.max_run_seconds}")
        if self.model_repository is not None and not Path(self.model_repository).is_dir():
            raise ValueError(f"model repository {str(self.model_repository)!r} is not a directory")


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    host: str
    state: ServiceState
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(config: ServerConfig | None = None, **overrides) -> RunningServer:
    """Start serving in background threads; `port=0` picks a free port (see `.port`)."""
    config = config or ServerConfig(**overrides)
    runtime = Runtime(config.provider, config.session_cache_size, config.intra_op_threads,
                      config.max_concurrent_runs, config.session_cache_bytes or physical_memory_bytes() * 2 // 5,
                      config.run_memory_bytes or physical_memory_bytes() // 2, config.max_run_seconds)
    if config.provider == "cuda" and runtime.provider != CUDA:   # asked for by name: no silent CPU
        raise RuntimeError(f"--provider cuda: {runtime.choice.note}")
    store = ModelStore(runtime, config.model_repository, config.limits.max_upload_bytes,
                       config.loaded_model_bytes or physical_memory_bytes() // 4)
    state = ServiceState(runtime, store, config.limits)
    state.work_slots = WorkSlots(config.workers)
    max_msg = config.limits.max_request_bytes  # what GetServerInfo reports is what is enforced
    # threads beyond the work slots: health checks and the light calls are answered while every
    # slot runs a long call (see api/registration.WorkSlots)
    threads = config.workers + LIGHT_THREADS
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vis-rpc"),
                         options=[("grpc.max_receive_message_length", max_msg),
                                  # a result chunk carries up to chunk_bytes of tensor data plus its header
                                  ("grpc.max_send_message_length", max(8 << 20, config.limits.chunk_bytes + (1 << 20))),
                                  ("grpc.so_reuseport", 0)])
    add_servicer(server, vis_pb2.DESCRIPTOR.services_by_name["ModelService"], ModelServicer(state), state.work_slots)
    add_servicer(server, vis_pb2.DESCRIPTOR.services_by_name["VisService"], VisServicer(state), state.work_slots)
    service_names = SERVICE_NAMES
    for family in (attribution_servicer, localization_servicer, optimization_servicer):  # each registers its own service
        service_names += tuple(family.register(server, state))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(service_names + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:   # grpc raises RuntimeError ("Failed to bind ...") where older versions returned 0
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}: the port is in use, or the host is not an "
                      "address of this machine (--host, --port; --port 0 picks a free port)")
    server.start()
    for name in ("",) + service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("vis-service listening on %s:%d (provider %s, repository %s)", config.host, port, runtime.provider,
             config.model_repository)
    return RunningServer(server, port, config.host, state, health_servicer)
