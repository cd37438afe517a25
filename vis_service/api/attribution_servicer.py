"""AttributionService (proto/vis/v1/attribution.proto): saliency family and deconvnet projections."""
from __future__ import annotations

import grpc

from ..errors import InvalidArgument
from ..gen import attribution_pb2, attribution_pb2_grpc
from ..methods import attribution_common, limits
from ..methods.deconvnet import deconvnet
from ..methods.gradient_x_input import gradient_x_input
from ..methods.guided_backprop import guided_backprop
from ..methods.integrated_gradients import integrated_gradients
from ..methods.progress import MethodResult
from ..methods.saliency import saliency
from ..methods.smoothgrad import DEFAULT_NOISE, DEFAULT_SAMPLES, smoothgrad
from . import convert
from .errors import handles_errors
from .registration import add_servicer
from .servicers import ServiceState
from .streaming import run_streaming
from .tensors import tensor_from_proto

METHODS = ("saliency", "gradient_x_input", "smoothgrad", "integrated_gradients", "guided_backprop")


def _method(request: attribution_pb2.AttributionRequest, max_batch: int):
    """The method as a function of (runtime, model, attribution input, progress); options validated here.

    `max_batch`: the server's limit, which also bounds the rows of one onnxruntime run."""
    name = request.method or "saliency"
    if request.batch < 0:   # every method: also those that make one run and do not use it
        raise InvalidArgument("batch", f"must be >= 0 (0 = server default), got {request.batch}")
    if name == "saliency":
        signed = request.saliency.signed
        return lambda rt, m, ai, p: saliency(rt, m, ai, signed=signed)
    if name == "gradient_x_input":
        return lambda rt, m, ai, p: gradient_x_input(rt, m, ai)
    if name == "guided_backprop":
        return lambda rt, m, ai, p: guided_backprop(rt, m, ai)
    limits.check_batch("batch", request.batch, max_batch, "rows per run")
    if name == "smoothgrad":
        o = request.smoothgrad
        samples = DEFAULT_SAMPLES if not o.HasField("samples") else o.samples
        noise = DEFAULT_NOISE if not o.HasField("noise") else o.noise
        if samples <= 0:
            raise InvalidArgument("smoothgrad.samples", f"must be > 0, got {samples}")
        return lambda rt, m, ai, p: smoothgrad(rt, m, ai, samples, noise, o.vargrad, o.seed, request.batch, p,
                                               max_batch)
    if name == "integrated_gradients":
        o = request.integrated_gradients
        steps = 50 if not o.HasField("steps") else o.steps
        if steps <= 0:
            raise InvalidArgument("integrated_gradients.steps", f"must be > 0, got {steps}")
        custom = (tensor_from_proto(o.baseline_tensor, "integrated_gradients.baseline_tensor")
                  if o.HasField("baseline_tensor") else None)
        if (o.baseline or "black") not in attribution_common.BASELINES:
            raise InvalidArgument("integrated_gradients.baseline",
                                  f"unknown baseline {o.baseline!r}; allowed: {', '.join(attribution_common.BASELINES)}")
        return lambda rt, m, ai, p: integrated_gradients(rt, m, ai, steps, o.baseline, custom, o.blur_sigma, o.rule,
                                                         o.memory_budget_bytes, request.batch, p, max_batch)
    raise InvalidArgument("method", f"unknown method {name!r}; allowed: {', '.join(METHODS)}")


class AttributionServicer(attribution_pb2_grpc.AttributionServiceServicer):
    def __init__(self, state: ServiceState):
        self.s = state

    def _stream_result(self, model, result: MethodResult, label_targets: bool, region):
        labels = dict(result.labels)
        if label_targets and "target_index" in result.tensors:
            names = convert.labels_for(model, result.tensors["target_index"])
            if names:
                labels["target_index"] = names
        return self.s.stream(result.tensors, region, scalars=result.scalars, labels=labels, text=result.text)

    @handles_errors
    def Attribute(self, request, context):
        method = _method(request, self.s.limits.max_batch)  # validate options before any work
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        feeds = self.s.feeds(model, request.input, region=region)
        obj = convert.objective(request.target)
        preprocess = request.input.preprocess if request.input.HasField("preprocess") else None

        def work(progress):
            ai = attribution_common.prepare(self.s.runtime, model, feeds, obj, preprocess)
            return method(self.s.runtime, model, ai, progress)

        yield from run_streaming(context, work, lambda r: self._stream_result(model, r, obj.kind == "output", region))

    @handles_errors
    def Deconvnet(self, request, context):
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        feeds = self.s.feeds(model, request.input, region=region)
        target = convert.objective(request.target) if request.HasField("target") else None
        preprocess = request.input.preprocess if request.input.HasField("preprocess") else None

        def work(progress):
            return deconvnet(self.s.runtime, model, feeds, request.layer, request.top_k, target, request.crop,
                             request.rule_set or "deconvnet", progress, self.s.limits.max_batch, preprocess)

        yield from run_streaming(context, work, lambda r: self._stream_result(model, r, False, region))


def register(server: grpc.Server, state: ServiceState) -> list[str]:
    """Add the servicer to `server`; returns the full service names it serves."""
    # tensor chunks arrive pre-serialized: register with the pass-through serializer
    return [add_servicer(server, attribution_pb2.DESCRIPTOR.services_by_name["AttributionService"],
                         AttributionServicer(state), state.work_slots)]
