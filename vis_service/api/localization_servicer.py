"""LocalizationService (proto/vis/v1/attribution.proto): CAM family and occlusion sensitivity."""
from __future__ import annotations

import grpc

from ..gen import attribution_pb2, attribution_pb2_grpc
from ..methods import cam, limits, occlusion
from . import convert
from .errors import handles_errors
from .registration import add_servicer
from .servicers import ServiceState
from .streaming import run_streaming


def _preprocess(batch):
    return batch.preprocess if batch.HasField("preprocess") else None


class LocalizationServicer(attribution_pb2_grpc.LocalizationServiceServicer):
    def __init__(self, state: ServiceState):
        self.s = state

    def _batch(self, value: int) -> int:
        # the perturbed copies of one run live in memory at once: bounded like request batches (the
        # default too, on a server started with a --max-batch below it)
        limit = self.s.limits.max_batch
        return limits.check_batch("batch", value, limit, "copies per run") or min(cam.DEFAULT_BATCH, limit)

    def _to_stream(self, region):
        return lambda result: self.s.stream(result.tensors, region, scalars=result.scalars, labels=result.labels,
                                            text=result.text)

    @handles_errors
    def Cam(self, request, context):
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        feeds = self.s.feeds(model, request.input, region=region)
        obj = convert.objective(request.target)

        def method(progress):
            return cam.compute_cam(self.s.runtime, model, feeds, request.method or "gradcam", request.layer, obj,
                                   self._batch(request.batch), _preprocess(request.input), progress)

        yield from run_streaming(context, method, self._to_stream(region))

    @handles_errors
    def Occlusion(self, request, context):
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        feeds = self.s.feeds(model, request.input, region=region)
        obj = convert.objective(request.target)

        def method(progress):
            return occlusion.compute_occlusion(self.s.runtime, model, feeds, obj, list(request.patch),
                                               list(request.stride), request.fill or "grey", request.layer,
                                               self._batch(request.batch), _preprocess(request.input), progress)

        yield from run_streaming(context, method, self._to_stream(region))


def register(server: grpc.Server, state: ServiceState) -> list[str]:
    """Add the servicer to `server`; returns the full service names it serves."""
    # tensor chunks arrive pre-serialized: register with the pass-through serializer
    return [add_servicer(server, attribution_pb2.DESCRIPTOR.services_by_name["LocalizationService"],
                         LocalizationServicer(state), state.work_slots)]
