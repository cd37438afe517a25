"""Optimization loops (activation maximization, class models, feature inversion).

Mixed into :class:`vis_client.Client`; uses its channel and stream helpers.

    from vis_client.optimization import Objective
    r = client.maximize("squeezenet", [Objective.channel("fire6/expand3x3_1", 10)], steps=128,
                        snapshot_every=16, on_snapshot=lambda s: print(s.step, s.images.shape))
    r.images            # uint8 [B, H, W, 3]
    inv = client.invert("squeezenet", "cat.png", ["conv1_2", "fire5/concat_1"], steps=100)
    inv.feature_error   # [L, S]

The server runs the loop and streams a Progress per step (``on_step``) and, every
``snapshot_every`` steps, the current images (``on_snapshot``); ``cancel`` (a
``threading.Event`` or a callable) stops it within one step and raises
:class:`~vis_client.errors.Cancelled`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arguments import INT64_MAX, UINT64_MAX, check_bool, check_int
from .gen import optimization_pb2, vis_pb2
from .stream import Result
from .tensors import ChunkAssembler
from .wire import make_stub

__all__ = ["Objective", "Snapshot", "OptimizationResult", "LayerInversion", "InversionResult", "OptimizationMixin"]

SNAPSHOT_PREFIX = "snapshot/"


# ----------------------------------------------------------------------------
# Objective builders


def _images(images) -> list[int]:
    if images is None:
        return []
    if isinstance(images, (int, np.integer, bool, np.bool_)) or not isinstance(images, (Sequence, np.ndarray)) \
            or isinstance(images, (str, bytes)):
        return [check_int(images, "images")]
    return [check_int(i, "images") for i in images]


def _term(kind: str, msg, weight: float, images) -> optimization_pb2.ObjectiveTerm:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating, np.integer)):
        raise TypeError(f"weight must be a number, got {weight!r}")
    return optimization_pb2.ObjectiveTerm(**{kind: msg}, weight=float(weight), images=_images(images))


def _layer(layer) -> str:
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"layer must be a non-empty string, got {layer!r}")
    return layer


class Objective:
    """Builders for objective terms (maximized; weights >= 0). ``images``: the batch entries a
    term applies to (an int or a list; ``None`` = all images) -- one term per image optimizes
    several units side by side in one batch. Pass a list of terms to :meth:`maximize`: the
    objective is their weighted sum."""

    @staticmethod
    def neuron(layer: str, channel: int, y: int | None = None, x: int | None = None, *, weight: float = 1.0,
               images=None) -> optimization_pb2.ObjectiveTerm:
        """``layer[b, channel, y, x]``; the centre unit when ``y``/``x`` are None."""
        msg = optimization_pb2.NeuronObjective(layer=_layer(layer), channel=check_int(channel, "channel", None, INT64_MAX))
        if y is not None:
            msg.y = check_int(y, "y", None, INT64_MAX)
        if x is not None:
            msg.x = check_int(x, "x", None, INT64_MAX)
        return _term("neuron", msg, weight, images)

    @staticmethod
    def channel(layer: str, channel: int, *, weight: float = 1.0, images=None) -> optimization_pb2.ObjectiveTerm:
        """Mean activation of one channel over all positions."""
        return _term("channel", optimization_pb2.ChannelObjective(layer=_layer(layer), channel=check_int(channel, "channel", None, INT64_MAX)),
                     weight, images)

    @staticmethod
    def layer_l2(layer: str, *, weight: float = 1.0, images=None) -> optimization_pb2.ObjectiveTerm:
        """Mean of the squared activations of a whole layer (deep dream)."""
        return _term("layer", optimization_pb2.LayerObjective(layer=_layer(layer)), weight, images)

    @staticmethod
    def class_score(index: int, probability: bool = False, *, output: str | None = None, weight: float = 1.0,
                    images=None) -> optimization_pb2.ObjectiveTerm:
        """The class logit (pre-softmax; default) or the softmax probability of class ``index``."""
        msg = optimization_pb2.ClassObjective(index=check_int(index, "index", None, INT64_MAX), probability=check_bool(probability, "probability"),
                                              output=output or "")
        return _term("class_score", msg, weight, images)

    @staticmethod
    def direction(layer: str, vector, *, weight: float = 1.0, images=None) -> optimization_pb2.ObjectiveTerm:
        """Mean over positions of ``<layer[b, :, y, x], vector>`` (a direction in channel space)."""
        v = np.asarray(vector, dtype=np.float64).ravel()
        return _term("direction", optimization_pb2.DirectionObjective(layer=_layer(layer), vector=v.tolist()),
                     weight, images)


# ----------------------------------------------------------------------------
# Results


@dataclass
class Snapshot:
    """Images streamed while the loop runs: ``step`` (1-based), ``images`` uint8 [B, H, W, 3]
    (for an inversion: [S, H, W, 3] of ``layer``)."""
    step: int
    images: np.ndarray
    layer: str | None = None


@dataclass
class OptimizationResult:
    """Result of :meth:`OptimizationMixin.maximize` / :meth:`~OptimizationMixin.class_model`.

    ``images``: uint8 [B, H, W, 3] for display; ``x``: the images in model space (the model
    input's shape); ``objective``: [B] final weighted objective per image; ``terms``: [B, T]
    unweighted final term values (NaN where a term does not apply); ``losses``: column name ->
    [steps] history ("loss", "objective", "l2", "tv", "diversity", "lr"); ``snapshots``: what
    was streamed."""
    images: np.ndarray
    x: np.ndarray
    objective: np.ndarray
    terms: np.ndarray
    losses: dict[str, np.ndarray]
    snapshots: list[Snapshot] = field(default_factory=list)
    text: dict[str, str] = field(default_factory=dict)
    result: Result = field(repr=False, default_factory=Result)


@dataclass
class LayerInversion:
    """One layer of an inversion: S reconstructions (random starts) and their errors."""
    layer: str
    x: np.ndarray                 # [S, ...] model space
    images: np.ndarray            # uint8 [S, H, W, 3]
    feature_error: np.ndarray     # [S] ||Phi(x) - Phi0|| / ||Phi0|| of the returned (pixel-clipped) x
    pixel_error: np.ndarray       # [S] ||P - P0|| / ||P0 - 127.5||
    losses: dict[str, np.ndarray]  # column -> [steps]


@dataclass
class InversionResult:
    """Result of :meth:`OptimizationMixin.invert`: per layer (in request order) a
    :class:`LayerInversion`; ``reference``: uint8 [H, W, 3] the reference as the model saw it."""
    layers: list[LayerInversion]
    reference: np.ndarray
    snapshots: list[Snapshot] = field(default_factory=list)
    result: Result = field(repr=False, default_factory=Result)

    def __getitem__(self, layer: str | int) -> LayerInversion:
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, (bool, np.bool_)):
            return self.layers[int(layer)]
        for li in self.layers:
            if li.layer == layer:
                return li
        raise KeyError(layer)

    @property
    def feature_error(self) -> np.ndarray:
        """[L, S]"""
        return np.stack([li.feature_error for li in self.layers])

    @property
    def pixel_error(self) -> np.ndarray:
        """[L, S]"""
        return np.stack([li.pixel_error for li in self.layers])


# ----------------------------------------------------------------------------
# Stream consumption with snapshot callbacks


class _SnapshotTap:
    """Wraps a streaming call: passes messages on to ``collect`` except snapshot tensor chunks,
    which it reassembles itself and hands to ``on_snapshot`` as soon as each is complete."""

    def __init__(self, call, on_snapshot: Callable[[Snapshot], Any] | None):
        self._call = call
        self._it = iter(call)
        self._assembler = ChunkAssembler()
        self._on_snapshot = on_snapshot
        self.snapshots: list[Snapshot] = []

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            msg = next(self._it)
            if msg.WhichOneof("kind") == "tensor" and msg.tensor.name.startswith(SNAPSHOT_PREFIX):
                done = self._assembler.add(msg.tensor)
                if done is not None:
                    snap = _parse_snapshot(*done)
                    self.snapshots.append(snap)
                    if self._on_snapshot is not None:
                        self._on_snapshot(snap)
                continue
            return msg

    def cancel(self):
        return self._call.cancel()


def _parse_snapshot(name: str, images: np.ndarray) -> Snapshot:
    rest = name[len(SNAPSHOT_PREFIX):]
    layer, _, step = rest.rpartition("/")
    return Snapshot(int(step), images, layer or None)


def _set_optional(msg, name: str, value, cast=float) -> None:
    if value is not None:
        setattr(msg, name, cast(value))


def _optimizer(name, lr, schedule, momentum=None) -> optimization_pb2.OptimizerOptions:
    o = optimization_pb2.OptimizerOptions(name=name or "", schedule=schedule or "")
    _set_optional(o, "lr", lr)
    _set_optional(o, "momentum", momentum)
    return o


# ----------------------------------------------------------------------------
# Mixin


class OptimizationMixin:
    """Client methods for ``OptimizationService`` (proto/vis/v1/optimization.proto)."""

    def _optimization_stub(self):
        stub = getattr(self, "_optimization_stub_", None)
        if stub is None:
            stub = make_stub(self._channel, optimization_pb2.DESCRIPTOR.services_by_name["OptimizationService"])
            self._optimization_stub_ = stub
        return stub

    def _optimization_stream(self, method, request, on_step, on_snapshot, cancel,
                             inputs=()) -> tuple[Result, list[Snapshot]]:
        """The inputs and final tensors use the client's transport; snapshots are always streamed."""
        for fn, what in ((on_step, "on_step"), (on_snapshot, "on_snapshot")):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what} must be callable, got {fn!r}")
        taps: list[_SnapshotTap] = []

        def tap(call):
            taps.append(_SnapshotTap(call, on_snapshot))
            return taps[-1]

        res = self._stream(method, request, on_step, cancel, inputs, tap=tap)
        return res, taps[0].snapshots

    def maximize(self, model, objectives, *, steps: int = 256, lr: float | None = None, optimizer: str = "adam",
                 schedule: str | None = None, batch: int = 1, parameterization: str = "fourier",
                 decorrelate: bool = True, jitter: int | None = None, scale: float | None = None,
                 rotate: float | None = None, l2: float | None = None, tv: float | None = None,
                 tv_beta: float | None = None, blur_every: int = 0, blur_sigma: float | None = None,
                 diversity: float = 0.0, diversity_layer: str | None = None, init_std: float | None = None,
                 fourier_decay: float | None = None, seed: int = 0, snapshot_every: int = 0, preprocess=None,
                 on_step: Callable[[vis_pb2.Progress], Any] | None = None,
                 on_snapshot: Callable[[Snapshot], Any] | None = None, cancel=None) -> OptimizationResult:
        """Activation maximization: images that maximize the weighted sum of ``objectives``
        (a term from :class:`Objective` or a list of them).

        ``parameterization``: "fourier" (Lucid's 1/f spectrum, default), "pixel" or "raw";
        ``decorrelate``: Lucid's colour decorrelation. ``jitter`` (pixels), ``scale`` (relative),
        ``rotate`` (degrees): random transforms per step (None = server default 8 / 0.05 / 5;
        0 = off). ``l2``, ``tv`` (with ``tv_beta``), ``blur_every``/``blur_sigma``, ``diversity``:
        regularizers (None = server default). ``optimizer``: "adam" or "sgd"; ``schedule``:
        "constant", "cosine", "step", "linear". ``on_step(progress)`` gets each step's
        Progress (``progress.values``: loss terms); ``on_snapshot(Snapshot)`` the images every
        ``snapshot_every`` steps. Same ``seed`` -> identical result. ``batch`` is at most the
        server's --max-batch (ResourceExhausted above); a loop that diverges (inf / NaN loss,
        gradient or image) raises InvalidArgument naming ``optimizer.lr``.
        """
        from .client import _model_ref, build_preprocessing

        if isinstance(objectives, optimization_pb2.ObjectiveTerm):
            objectives = [objectives]
        if isinstance(objectives, vis_pb2.Target) or not isinstance(objectives, (Sequence, np.ndarray)) \
                or isinstance(objectives, (str, bytes)):
            raise TypeError(f"objectives must be an Objective.* term or a list of them (Objective.channel, neuron, "
                            f"class_score, ...; Target.* is for the gradient and attribution calls), got {objectives!r}")
        objectives = list(objectives)
        for t in objectives:
            if not isinstance(t, optimization_pb2.ObjectiveTerm):
                raise TypeError(f"objectives must be Objective.* terms, got {type(t).__name__}")
        req = optimization_pb2.MaximizeRequest(
            model=_model_ref(model), objectives=objectives, steps=check_int(steps, "steps"), batch=check_int(batch, "batch"),
            optimizer=_optimizer(optimizer, lr, schedule), parameterization=parameterization or "",
            decorrelate=check_bool(decorrelate, "decorrelate"), blur_every=check_int(blur_every, "blur_every"),
            diversity=float(diversity), diversity_layer=diversity_layer or "", seed=check_int(seed, "seed", 0, UINT64_MAX),
            snapshot_every=check_int(snapshot_every, "snapshot_every"))
        for name, value, cast in (("jitter", jitter, int), ("scale", scale, float), ("rotate", rotate, float),
                                  ("l2", l2, float), ("tv", tv, float), ("tv_beta", tv_beta, float),
                                  ("blur_sigma", blur_sigma, float), ("init_std", init_std, float),
                                  ("fourier_decay", fourier_decay, float)):
            _set_optional(req, name, value, cast)
        pre = build_preprocessing(preprocess)
        if pre is not None:
            req.preprocess.CopyFrom(pre)
        res, snaps = self._optimization_stream(self._optimization_stub().Maximize, req, on_step, on_snapshot, cancel)
        columns = res.labels.get("losses", [])
        losses = res.tensors.get("losses")
        return OptimizationResult(
            images=res.tensors["images"], x=res.tensors["x"], objective=res.tensors["objective"],
            terms=res.tensors["terms"],
            losses={c: losses[:, i] for i, c in enumerate(columns)} if losses is not None else {},
            snapshots=snaps, text=dict(res.text), result=res)

    def class_model(self, model, class_index: int, *, steps: int = 200, l2: float | None = None,
                    parameterization: str = "raw", lr: float | None = None, probability: bool = False,
                    **kwargs) -> OptimizationResult:
        """Class model visualization (Simonyan et al. 2014): maximize the class score (logit) with
        an L2 penalty (server default 30 on the mean squared deviation from grey in [0, 1] pixel
        units), directly on the image ("raw"; Adam lr 0.01, jitter 4 by default); ``probability``:
        the softmax probability of the class instead of its logit. Other keywords as
        :meth:`maximize`; ``parameterization="fourier"`` gives Lucid-style class images."""
        return self.maximize(model, [Objective.class_score(class_index, probability)], steps=steps, l2=l2,
                             parameterization=parameterization, lr=lr, **kwargs)

    def invert(self, model, reference, layers: str | Sequence[str] | None = None, *, steps: int = 200,
               lr: float | None = None, optimizer: str = "sgd", schedule: str | None = None,
               alpha: float = 6.0, beta: float = 2.0, lambda_alpha: float | None = None,
               lambda_tv: float | None = None, pixel_norm: float | None = None, starts: int = 1,
               init_std: float | None = None, seed: int = 0, snapshot_every: int = 0, preprocess=None,
               on_step: Callable[[vis_pb2.Progress], Any] | None = None,
               on_snapshot: Callable[[Snapshot], Any] | None = None, cancel=None) -> InversionResult:
        """Feature inversion (Mahendran & Vedaldi 2015): reconstruct ``reference`` (one image: a
        path / PIL image / bytes, or a model-space array [1, ...]) from its features at each of
        ``layers`` (a name or a list: a layer sweep; None = class scores). ``starts`` random starts
        per layer run in one batch (at most the server's --max-batch: ResourceExhausted above).
        ``alpha``/``beta``/``lambda_alpha``/``lambda_tv``: the regularizers (None = server default;
        finite). Returns per layer the reconstructions and their relative feature and pixel errors;
        a loop that diverges raises InvalidArgument naming ``optimizer.lr``."""
        from .client import _input_batch, _model_ref, _names

        layer_names = _names(layers, "layers")
        batch, inputs = _input_batch(reference, preprocess, model)
        req = optimization_pb2.InvertRequest(
            model=_model_ref(model), input=batch, layers=layer_names,
            steps=check_int(steps, "steps"), starts=check_int(starts, "starts"), optimizer=_optimizer(optimizer, lr, schedule),
            alpha=float(alpha), beta=float(beta), pixel_norm=float(pixel_norm or 0.0), seed=check_int(seed, "seed", 0, UINT64_MAX),
            snapshot_every=check_int(snapshot_every, "snapshot_every"))
        _set_optional(req, "lambda_alpha", lambda_alpha)
        _set_optional(req, "lambda_tv", lambda_tv)
        _set_optional(req, "init_std", init_std)
        res, snaps = self._optimization_stream(self._optimization_stub().Invert, req, on_step, on_snapshot, cancel,
                                               inputs)
        names = res.labels.get("layers", [])
        columns = res.labels.get("losses", [])
        t = res.tensors
        per_layer = []
        for i, name in enumerate(names):
            per_layer.append(LayerInversion(
                layer=name, x=t["reconstructions"][i], images=t["images"][i], feature_error=t["feature_error"][i],
                pixel_error=t["pixel_error"][i], losses={c: t["losses"][i, :, k] for k, c in enumerate(columns)}))
        return InversionResult(per_layer, t["reference"][0], snaps, res)
