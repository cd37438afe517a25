"""OptimizationService (proto/vis/v1/optimization.proto): activation maximization, inversion.

Requests become settings dataclasses here (defaults filled in, fields validated by
name before any work); the loops run in methods/optimization under run_streaming,
so a client's cancel stops them at the next step. Snapshots the loop emits are
queued and streamed as TensorChunks just before the Progress of their step.
"""
from __future__ import annotations

import queue
from typing import Iterator

import grpc
import numpy as np

from ..errors import InvalidArgument
from ..gen import optimization_pb2, vis_pb2
from ..methods.optimization import InvertSettings, MaximizeSettings, invert, maximize
from ..methods.optimization.objectives import Term
from ..methods.optimization.optimizers import OptimizerSettings
from ..methods.optimization.transforms import TransformSettings
from ..models.config import resolve_image_spec
from ..models.inputs import image_dims_at
from .errors import handles_errors
from .registration import add_servicer
from .servicers import ServiceState
from .streaming import run_streaming
from .tensors import chunk_tensor


def _opt(o, field: str, name: str, schedule: str, adam_lr: float = 0.05) -> OptimizerSettings:
    s = OptimizerSettings(name=o.name or name)
    s.lr = o.lr if o.HasField("lr") else (0.02 if s.name == "sgd" else adam_lr)
    s.momentum = o.momentum or 0.9
    s.beta1 = o.beta1 or 0.9
    s.beta2 = o.beta2 or 0.999
    s.schedule = o.schedule or schedule
    s.decay_factor = o.decay_factor or 0.1
    s.decay_every = o.decay_every
    s.validate(field)
    return s


def _terms(request: optimization_pb2.MaximizeRequest) -> list[Term]:
    terms = []
    for i, t in enumerate(request.objectives):
        f = f"objectives[{i}]"
        kind = t.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(f, "set one of neuron, channel, layer, class_score, direction")
        weight = t.weight if t.HasField("weight") else 1.0
        common = dict(weight=weight, images=list(t.images), field=f)
        if kind == "neuron":
            n = t.neuron
            terms.append(Term("neuron", n.layer, channel=n.channel, y=n.y if n.HasField("y") else None,
                              x=n.x if n.HasField("x") else None, **common))
        elif kind == "channel":
            terms.append(Term("channel", t.channel.layer, channel=t.channel.channel, **common))
        elif kind == "layer":
            terms.append(Term("layer", t.layer.layer, **common))
        elif kind == "class_score":
            c = t.class_score
            terms.append(Term("class_score", c.output, index=c.index, probability=c.probability, **common))
        else:
            terms.append(Term("direction", t.direction.layer, vector=list(t.direction.vector), **common))
    return terms


def maximize_settings(r: optimization_pb2.MaximizeRequest, max_batch: int) -> MaximizeSettings:
    param = r.parameterization or "fourier"
    raw = param == "raw"
    if r.steps < 0:
        raise InvalidArgument("steps", f"must be >= 1 (0 = default 256), got {r.steps}")
    if r.batch < 0:
        raise InvalidArgument("batch", f"must be >= 1 (0 = default 1), got {r.batch}")
    s = MaximizeSettings(
        terms=_terms(r), steps=r.steps or 256, batch=r.batch or 1,
        optimizer=_opt(r.optimizer, "optimizer", "adam", "constant", 0.01 if raw else 0.05),
        parameterization=param,
        decorrelate=r.decorrelate if r.HasField("decorrelate") else True,
        fourier_decay=r.fourier_decay or 1.0, init_std=r.init_std or 0.01,
        transforms=TransformSettings(jitter=r.jitter if r.HasField("jitter") else (4 if raw else 8),
                                     scale=r.scale if r.HasField("scale") else (0.0 if raw else 0.05),
                                     rotate=r.rotate if r.HasField("rotate") else (0.0 if raw else 5.0)),
        l2=r.l2 if r.HasField("l2") else (30.0 if raw else 0.0),
        tv=r.tv if r.HasField("tv") else 0.0, tv_beta=r.tv_beta or 1.0,
        blur_every=r.blur_every, blur_sigma=r.blur_sigma or 0.5,
        diversity=r.diversity, diversity_layer=r.diversity_layer, seed=r.seed, snapshot_every=r.snapshot_every)
    s.validate(max_batch)
    return s


def invert_settings(r: optimization_pb2.InvertRequest, max_batch: int) -> InvertSettings:
    if r.steps < 0:
        raise InvalidArgument("steps", f"must be >= 1 (0 = default 200), got {r.steps}")
    if r.starts < 0:
        raise InvalidArgument("starts", f"must be >= 1 (0 = default 1), got {r.starts}")
    s = InvertSettings(
        layers=list(r.layers), steps=r.steps or 200, starts=r.starts or 1,
        optimizer=_opt(r.optimizer, "optimizer", "sgd", "step"),
        alpha=r.alpha or 6.0, beta=r.beta or 2.0,
        lambda_alpha=r.lambda_alpha if r.HasField("lambda_alpha") else 1e-4,
        lambda_tv=r.lambda_tv if r.HasField("lambda_tv") else 5e-3,
        pixel_norm=r.pixel_norm or 80.0, tv_norm=r.tv_norm, init_std=r.init_std or 0.1, seed=r.seed,
        snapshot_every=r.snapshot_every)
    s.validate(max_batch)
    return s


class OptimizationServicer:
    def __init__(self, state: ServiceState):
        self.s = state

    def _spec(self, model, preprocess, field: str, shape=None):
        """`shape`: the reference image's, which sizes a model whose image size is free."""
        return resolve_image_spec(model.config, preprocess, model.image_input, image_dims_at(model, shape), field)

    def _run(self, context, work, region) -> Iterator:
        """run_streaming, with the loop's snapshots streamed before the Progress of their step.

        `region` (ServiceState.shared_region) takes the final result's tensors; snapshots are always streamed."""
        pending: queue.SimpleQueue = queue.SimpleQueue()
        chunk = self.s.limits.chunk_bytes

        def on_snapshot(name: str, array: np.ndarray, done: int) -> None:
            pending.put((done, name, array))

        def to_stream(result):
            return self.s.stream(result.tensors, region, scalars=result.scalars, labels=result.labels,
                                 text=result.text)

        held = []  # the worker runs ahead of the stream: hold snapshots until their step's Progress
        for msg in run_streaming(context, lambda progress: work(progress, on_snapshot), to_stream):
            while True:
                try:
                    held.append(pending.get_nowait())
                except queue.Empty:
                    break
            is_progress = isinstance(msg, vis_pb2.ResultChunk) and msg.HasField("progress")
            upto = msg.progress.done if is_progress else float("inf")
            for item in [h for h in held if h[0] <= upto]:
                yield from chunk_tensor(item[1], item[2], chunk)
            held = [h for h in held if h[0] > upto]
            yield msg

    @handles_errors
    def Maximize(self, request, context):
        settings = maximize_settings(request, self.s.limits.max_batch)
        region = self.s.shared_region(context)
        model = self.s.store.get(request.model)
        spec = self._spec(model, request.preprocess if request.HasField("preprocess") else None, "preprocess")

        def work(progress, on_snapshot):
            return maximize(self.s.runtime, model, spec, settings, progress, on_snapshot)

        yield from self._run(context, work, region)

    @handles_errors
    def Invert(self, request, context):
        settings = invert_settings(request, self.s.limits.max_batch)
        region = self.s.shared_region(context)  # before the feeds: the reference may lie in it
        model = self.s.store.get(request.model)
        feeds = self.s.feeds(model, request.input, region=region)
        pre = request.input.preprocess if request.input.HasField("preprocess") else None
        reference = feeds[model.image_input]
        spec = self._spec(model, pre, "input.preprocess", reference.shape)

        def work(progress, on_snapshot):
            return invert(self.s.runtime, model, spec, reference, settings, progress, on_snapshot)

        yield from self._run(context, work, region)


def register(server: grpc.Server, state: ServiceState) -> list[str]:
    """Add the servicer to `server`; returns the full service names it serves."""
    # tensor chunks arrive pre-serialized: register with the pass-through serializer
    return [add_servicer(server, optimization_pb2.DESCRIPTOR.services_by_name["OptimizationService"],
                         OptimizationServicer(state), state.work_slots)]
