"""gRPC servicers: proto in, library calls, proto out. No graph or numpy logic here."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import grpc

from .. import __version__
from ..errors import InvalidArgument, PermissionDenied, ResourceExhausted
from ..gen import vis_pb2, vis_pb2_grpc
from ..methods import activations, attribution_common, filters, gradient, inspection, limits
from ..methods.progress import NO_PROGRESS
from ..models.inputs import build_feeds
from ..models.store import ModelStore
from ..runtime.sessions import Runtime
from . import convert
from .errors import handles_errors
from .shared_memory import NAME_KEY, RegionMappings, SharedRegion, is_local_peer, region_from_metadata
from .streaming import cancellable, run_streaming
from .tensors import DEFAULT_CHUNK_BYTES, result_stream

log = logging.getLogger(__name__)


# Uploads stream 1 MiB chunks (the Python client's): a smaller request limit would refuse them.
MIN_REQUEST_BYTES = 2 << 20
MAX_REQUEST_BYTES = 2047 << 20   # gRPC's message size options are 32-bit ints
# A result message carries at most this much tensor data (a chunk of 0 bytes would never end).
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 10, 64 << 20


@dataclass
class Limits:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_upload_bytes: int = 1 << 30
    max_request_bytes: int = 64 << 20
    max_batch: int = 256

    def __post_init__(self):
        # sizes in MiB, the unit of the server's flags (which name these settings in usage errors)
        if not MIN_REQUEST_BYTES <= self.max_request_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"max_request_bytes must be in 2 MiB (uploads stream 1 MiB chunks) .. 2047 MiB "
                             f"(gRPC's largest message), got {_mib(self.max_request_bytes)}")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1 KiB .. 64 MiB, got {_mib(self.chunk_bytes)}")
        if self.max_upload_bytes <= 0:
            raise ValueError(f"max_upload_bytes must be > 0, got {_mib(self.max_upload_bytes)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


class ServiceState:
    """What every servicer shares: runtime (sessions), model store, limits."""

    def __init__(self, runtime: Runtime, store: ModelStore, limits: Limits):
        self.runtime = runtime
        self.store = store
        self.limits = limits
        self.regions = RegionMappings()  # same-host shared memory mappings, kept between calls
        self.work_slots = None           # registration.WorkSlots: calls doing work at once (set by the server)

    def feeds(self, model, batch: vis_pb2.InputBatch, field: str = "input", region: SharedRegion | None = None):
        """Validated feeds; raw inputs the client sent in the call's shared memory `region` are read in place."""
        feeds = build_feeds(model, convert.input_request(batch, field, region), self.limits.max_batch, field)
        limits.check_free_size_input(model, feeds, field)
        limits.check_input_fits(model, {k: v.shape for k, v in feeds.items()}, field)
        return feeds

    def shared_region(self, context: grpc.ServicerContext) -> SharedRegion | None:
        """The same-host shared memory region the call's metadata names (api/shared_memory.py), opened
        and checked now, before any input is read, and closed for writes when the call ends; None when it
        names none."""
        metadata = context.invocation_metadata()
        if any(key == NAME_KEY for key, _ in metadata or ()) and not is_local_peer(context.peer()):
            # a region is a file on the server's host: a caller elsewhere could only name (and have
            # results written into) some other client's region
            raise PermissionDenied(f"{NAME_KEY}: shared memory is for clients on the server's host (connected "
                                   f"through loopback or a unix socket); this call came from {context.peer()}")
        region = region_from_metadata(metadata, self.regions)
        if region is not None and not context.add_callback(region.close):
            region.close()  # the call already ended
        return region

    def stream(self, tensors, region: SharedRegion | None = None, **kw):
        """The result stream; tensors go into `region` (see shared_region) where they fit."""
        return result_stream(tensors, chunk_bytes=self.limits.chunk_bytes, region=region, **kw)


class ModelServicer(vis_pb2_grpc.ModelServiceServicer):
    def __init__(self, state: ServiceState):
        self.s = state

    def _info(self, model):
        return convert.model_info(model, gradient.gradient_support(model))

    @handles_errors
    def Upload(self, request_iterator, context):
        header = vis_pb2.UploadHeader()
        data = bytearray()  # one growing buffer, parsed as it is (not chunks joined into a second copy)
        limit = self.s.limits.max_upload_bytes
        for i, req in enumerate(request_iterator):
            kind = req.WhichOneof("part")
            if kind == "header":
                if i != 0:
                    what = "a header after chunks" if data else "a second header"
                    raise InvalidArgument("header", f"{what} (message {i}); send one header, as the first message")
                header = req.header
                if header.total_bytes > limit:
                    raise ResourceExhausted(f"upload of {header.total_bytes} bytes exceeds the limit of {limit} bytes "
                                            "(--max-upload-mb)")
            elif kind == "chunk":
                if len(data) + len(req.chunk) > limit:
                    raise ResourceExhausted(f"upload exceeds the limit of {limit} bytes (--max-upload-mb)")
                data += req.chunk
        if header.total_bytes and header.total_bytes != len(data):
            raise InvalidArgument("header.total_bytes", f"announced {header.total_bytes} bytes but received {len(data)}")
        model = self.s.store.upload(data, header.name, header.config if header.HasField("config") else None,
                                    list(header.labels), cancelled=lambda: not context.is_active())
        return self._info(model)

    @handles_errors
    def Load(self, request, context):
        return self._info(self.s.store.load(request.name, cancelled=lambda: not context.is_active()))

    @handles_errors
    def List(self, request, context):
        return vis_pb2.ListResponse(loaded=[self._info(m) for m in self.s.store.loaded()],
                                    repository=self.s.store.repository_names())

    @handles_errors
    def Inspect(self, request, context):
        # a light call (no work slot) unless it has to load a repository model first: that takes a
        # slot like Load (it took one of the threads kept for health checks)
        model = self.s.store.find(request.model)
        if model is None:
            with self.s.work_slots.held(context) if self.s.work_slots is not None else nullcontext():
                model = self.s.store.get(request.model)
        return convert.inspect_response(model, inspection.summarize(model), self._info(model))

    @handles_errors
    def Unload(self, request, context):
        return vis_pb2.UnloadResponse(unloaded=self.s.store.unload(request.model))


class VisServicer(vis_pb2_grpc.VisServiceServicer):
    def __init__(self, state: ServiceState):
        self.s = state

    @handles_errors
    def GetServerInfo(self, request, context):
        rt, lim = self.s.runtime, self.s.limits
        return vis_pb2.ServerInfo(
            version=__version__, provider=rt.provider, available_providers=list(rt.choice.available),
            provider_note=rt.choice.note, rule_sets=gradient.rule_set_names(), chunk_bytes=lim.chunk_bytes,
            max_upload_bytes=lim.max_upload_bytes, max_request_bytes=lim.max_request_bytes,
            model_repository=str(self.s.store.repository or ""), sessions_built=rt.sessions_built,
            sessions_cached=rt.sessions_cached, session_cache_size=rt.cache_size,
            session_cache_bytes=rt.cache_bytes, sessions_cached_bytes=rt.sessions_cached_bytes,
            max_run_bytes=rt.run_memory_bytes, max_loaded_bytes=self.s.store.max_loaded_bytes,
            loaded_bytes=self.s.store.loaded_bytes(), max_run_seconds=rt.gate.max_run_seconds)

    @handles_errors
    def Activations(self, request, context):
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        feeds = self.s.feeds(model, request.input, region=region)
        with cancellable(context):
            values = activations.compute_activations(self.s.runtime, model, feeds, list(request.layers),
                                                     allocate=region.allocate if region is not None else None)
        yield from self.s.stream(values, region, labels=activations.class_labels(model, values),
                                 layouts=activations.layouts(model, values))

    @handles_errors
    def Filters(self, request, context):
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        if not request.layer:
            raise InvalidArgument("layer", "required: a Conv / ConvTranspose / Gemm / MatMul node or its output tensor")
        yield from self.s.stream(filters.layer_filters(model, request.layer), region)

    @handles_errors
    def Gradient(self, request, context):
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        feeds = self.s.feeds(model, request.input, region=region)
        obj = convert.objective(request.target)
        budget = request.memory_budget_bytes
        if budget < 0:
            raise InvalidArgument("memory_budget_bytes", f"must be >= 0 (0 = default 2 GiB), got {budget}")
        limits.check_memory_budget("memory_budget_bytes", budget)
        x = feeds.get(model.image_input)
        # a batch larger than the memory budget's share runs in several runs, with progress
        # between them; one run stays on this thread (see streaming.run_streaming on its cost)
        rows = (attribution_common.rows_per_run(model, x, self.s.limits.max_batch, budget, self.s.limits.max_batch)
                if x is not None and x.ndim >= 2 else None)

        def work(progress=NO_PROGRESS):
            return gradient.compute_gradient(self.s.runtime, model, feeds, obj, list(request.wrt) or ["input"],
                                             request.rule_set or "gradient", dict(request.node_rules),
                                             rows_per_run=rows, progress=progress)

        if rows is not None and len(x) > rows:
            yield from run_streaming(context, work, lambda res: self._gradient_stream(model, obj, res, region))
            return
        with cancellable(context):
            res = work()
        yield from self._gradient_stream(model, obj, res, region)

    def _gradient_stream(self, model, obj, res, region):
        tensors = {f"grad/{k}": v for k, v in res.gradients.items()}
        tensors["objective"] = res.objective
        labels = {}
        if res.target_index is not None:
            tensors["target_index"] = res.target_index
            if obj.kind == "output":
                names = convert.labels_for(model, res.target_index)
                if names:
                    labels["target_index"] = names
        yield from self.s.stream(tensors, region, labels=labels, text={"objective_tensor": res.objective_tensor})
