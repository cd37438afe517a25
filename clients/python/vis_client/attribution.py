"""Attribution methods: saliency family (saliency, gradient x input, SmoothGrad / VarGrad,
Integrated Gradients, guided backprop) and deconvnet projections.

Mixed into :class:`vis_client.Client`; uses its channel and stream helpers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arguments import INT64_MAX, UINT64_MAX, check_bool, check_int
from .gen import attribution_pb2
from .display import display_image
from .stream import Result
from .tensors import to_proto
from .wire import make_stub

__all__ = ["AttributionMixin", "Attribution", "DeconvnetProjections", "display_image"]

IG_BASELINES = ("black", "zero", "blurred", "custom")


def _image_of(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """One input sample as [C, H, W] or [H, W, C] matching spatial size ``hw``."""
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[1:] == tuple(hw):
        return a
    if a.ndim == 3 and a.shape[:2] == tuple(hw):
        return a.transpose(2, 0, 1)
    return a


@dataclass
class Attribution:
    """Result of a saliency-family call.

    ``attribution``: input-shaped per-channel attribution; ``map``: [N, H, W] heat map
    (channels reduced as ``text["map"]`` says); ``input``: the preprocessed input the model
    saw; ``target_index``/``labels``: the class per image (output targets; the channel for channel
    and neuron targets, ``target_kind`` says which); ``extra``: other tensors
    (``completeness_gap``, ``delta``, ``objective``, ``baseline``, ``sigma`` ...); ``text``: the
    server's notes (map reduction, IG baseline and rule, ...)."""
    method: str
    attribution: np.ndarray
    map: np.ndarray
    input: np.ndarray | None
    target_index: np.ndarray | None
    labels: list[str] | None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    result: Result = field(repr=False, default_factory=Result)
    target_kind: str = "output"   # the Target's kind: output, channel, neuron or tensor

    def label(self, i: int) -> str:
        """"class K (name)" for image ``i``, "channel K" for a channel / neuron target, "" for a tensor target."""
        if self.target_index is None or self.target_index.shape[0] <= i or self.target_kind == "tensor":
            return ""
        k = int(np.asarray(self.target_index[i]).ravel()[0])
        if self.target_kind in ("channel", "neuron"):   # it said "class 4" for channel 4
            return f"channel {k}"
        name = self.labels[i] if self.labels and len(self.labels) > i else ""
        return f"class {k}" + (f" ({name})" if name else "")

    def render(self, i: int, path: str | os.PathLike | None = None, cmap: str = "jet", alpha: float = 0.5,
               colorbar: bool = True, clip_percentile: float = 99.0) -> np.ndarray:
        """Heat map of image ``i`` overlaid on its input (min-max scaled to 0..255), with a colour
        bar. A few pixels dominate gradient maps, so the colour scale ends at the
        ``clip_percentile`` of |map| (100 = its max); signed maps use a symmetric scale around 0.
        Returns the RGB image and writes a PNG if ``path`` is given."""
        from . import render

        heat = np.asarray(self.map[i], dtype=np.float64)
        if self.input is not None:
            img = display_image(_image_of(self.input[i], heat.shape), self.text.get("input_color", ""))
        else:
            img = np.zeros(heat.shape + (3,), np.uint8)
        top = float(np.percentile(np.abs(heat), clip_percentile)) if heat.size else 0.0
        if top <= 0:
            top = float(np.abs(heat).max(initial=0))
        signed = bool((heat < 0).any())
        lo, hi = (-top, top) if signed else (float(heat.min(initial=0)) if heat.min(initial=0) < top else 0.0, top)
        return render.heatmap_overlay(img, heat, path, cmap=cmap, alpha=alpha, colorbar=colorbar,
                                      vmin=lo, vmax=hi if hi > lo else None, label=self.method)


@dataclass
class DeconvnetProjections:
    """Result of :meth:`AttributionMixin.deconvnet`.

    ``projections`` [N, K, C, H, W] (one per selected unit), ``channels`` [N, K],
    ``positions`` [N, K, 2] (y, x in the layer), ``activations`` [N, K], ``boxes`` [N, K, 4]
    (top, left, bottom, right; exclusive) of each unit's receptive field in the input,
    ``crops`` [N, K, C, h, w] (when asked), ``input``. Projections and crops come in the input's
    layout: [N, K, H, W, C] and [N, K, h, w, C] for an NHWC model."""
    layer: str
    projections: np.ndarray
    channels: np.ndarray
    positions: np.ndarray
    activations: np.ndarray
    boxes: np.ndarray
    crops: np.ndarray | None
    input: np.ndarray | None
    text: dict[str, str] = field(default_factory=dict)
    result: Result = field(repr=False, default_factory=Result)

    def render_grid(self, i: int, path: str | os.PathLike | None = None, *, crops: bool | None = None,
                    upscale: int = 0) -> np.ndarray:
        """Grid of image ``i``'s projections (or crops, when present and ``crops`` is not False),
        each min-max scaled on its own as in Zeiler & Fergus. ``upscale``: pixels per input pixel
        (0: enough for tiles of at least 128 pixels, at most 8; receptive-field crops of early
        layers are a few pixels wide)."""
        from . import render

        use_crops = self.crops is not None if crops is None else crops
        tiles_src = self.crops[i] if use_crops and self.crops is not None else self.projections[i]
        tiles = []
        for t in tiles_src:
            hw = t.shape[1:] if t.shape[0] in (1, 3) else t.shape[:2]
            tiles.append(display_image(_image_of(t, hw), self.text.get("input_color", "")))
        h, w = tiles[0].shape[:2]
        k = upscale or max(1, min(8, -(-128 // max(1, min(h, w)))))
        arr = render._upscale(np.stack(tiles), k)
        rows, cols = render.grid_shape(len(tiles))
        return render._finish(render._tile(arr, rows, cols), path)


class AttributionMixin:
    """Client methods for ``AttributionService`` (proto/vis/v1/attribution.proto).

    ``target`` is what :meth:`Client.gradient`'s ``objective`` accepts: a class index, a list
    of indices (one per image), ``None`` (each image's top-1 class score, pre-softmax) or a
    ``Target.*`` message (a channel / neuron of any layer)."""

    def _attribution_stub(self):
        stub = getattr(self, "_attribution", None)
        if stub is None:
            stub = self._attribution = make_stub(self._channel, attribution_pb2.DESCRIPTOR.services_by_name["AttributionService"])
        return stub

    def _attribute(self, method: str, model, x, target, preprocess, on_progress=None, cancel=None,
                   **options) -> Attribution:
        from .client import _input_batch, _model_ref, build_target

        batch, inputs = _input_batch(x, preprocess, model)
        built = build_target(target)
        req = attribution_pb2.AttributionRequest(model=_model_ref(model), input=batch,
                                                 target=built, method=method, **options)
        res = self._stream(self._attribution_stub().Attribute, req, on_progress, cancel, inputs)
        t = dict(res.tensors)
        main = {k: t.pop(k, None) for k in ("attribution", "map", "input", "target_index")}
        return Attribution(method=method, attribution=main["attribution"], map=main["map"], input=main["input"],
                           target_index=main["target_index"], labels=res.labels.get("target_index"),
                           extra=t, text=dict(res.text), result=res, target_kind=built.WhichOneof("kind") or "output")

    def saliency(self, model, x, target=None, *, signed: bool = False, preprocess=None,
                 on_progress=None, cancel=None) -> Attribution:
        """Saliency map (Simonyan et al.): attribution = the gradient of the target w.r.t. the
        input; map = max over channels of |gradient| (``signed``: the signed gradient of the
        channel where |gradient| is largest)."""
        opts = attribution_pb2.SaliencyOptions(signed=check_bool(signed, "signed"))
        return self._attribute("saliency", model, x, target, preprocess, on_progress, cancel, saliency=opts)

    def gradient_x_input(self, model, x, target=None, *, preprocess=None, on_progress=None,
                         cancel=None) -> Attribution:
        """Gradient x input; map = sum over channels."""
        return self._attribute("gradient_x_input", model, x, target, preprocess, on_progress, cancel)

    def guided_backprop(self, model, x, target=None, *, preprocess=None, on_progress=None,
                        cancel=None) -> Attribution:
        """Guided backpropagation (rule set "guided"); map = max over channels of |attribution|."""
        return self._attribute("guided_backprop", model, x, target, preprocess, on_progress, cancel)

    def smoothgrad(self, model, x, target=None, *, samples: int = 25, noise: float = 0.15, vargrad: bool = False,
                   seed: int = 0, batch: int = 0, preprocess=None, on_progress=None, cancel=None) -> Attribution:
        """SmoothGrad: the mean gradient over ``samples`` noisy copies (sigma = ``noise`` x the
        image's value range), or with ``vargrad`` their variance; map = max over channels of
        |attribution|. ``seed`` fixes the noise (the same for every image, wherever it sits in the
        batch); ``batch`` caps copies per onnxruntime run (at most the server's --max-batch:
        ResourceExhausted above).
        Streams progress to ``on_progress``; set ``cancel`` (an Event) to stop."""
        opts = attribution_pb2.SmoothGradOptions(samples=check_int(samples, "samples"), noise=float(noise),
                                                 vargrad=check_bool(vargrad, "vargrad"),
                                                 seed=check_int(seed, "seed", 0, UINT64_MAX))
        return self._attribute("smoothgrad", model, x, target, preprocess, on_progress, cancel, smoothgrad=opts,
                               batch=check_int(batch, "batch", 0))

    def integrated_gradients(self, model, x, target=None, *, steps: int = 50, baseline: str = "black",
                             baseline_tensor=None, blur_sigma: float = 0, rule: str = "",
                             memory_budget_bytes: int = 0, batch: int = 0, preprocess=None,
                             on_progress=None, cancel=None) -> Attribution:
        """Integrated Gradients from ``baseline`` ("black": a black image in the model's input
        space, "zero", "blurred" (Gaussian, ``blur_sigma`` px), "custom" (``baseline_tensor``)).
        ``extra["completeness_gap"]`` = |sum(attribution) - (f(x) - f(baseline))| per image,
        ``extra["delta"]`` = f(x) - f(baseline); map = sum over channels. ``rule``: quadrature
        ("riemann_middle" default, "riemann_trapezoid", "gausslegendre"). ``blur_sigma``: 0 = 10% of
        the image's smaller side, at most its larger side. ``batch`` (rows per onnxruntime run) is at
        most the server's --max-batch, ``memory_budget_bytes`` (default 2 GiB) at most its physical
        memory (ResourceExhausted above)."""
        if not isinstance(baseline, str):
            raise TypeError("baseline must be a string")
        if baseline_tensor is not None and baseline in ("black", ""):
            baseline = "custom"
        if baseline_tensor is not None and baseline != "custom":   # it was left out without a word
            raise ValueError(f"baseline_tensor is the 'custom' baseline; baseline={baseline!r} takes none")
        opts = attribution_pb2.IntegratedGradientsOptions(
            steps=check_int(steps, "steps"), baseline=baseline, blur_sigma=float(blur_sigma), rule=rule,
            memory_budget_bytes=check_int(memory_budget_bytes, "memory_budget_bytes", 0, INT64_MAX))
        if baseline_tensor is not None:
            b = np.asarray(baseline_tensor)
            if b.dtype == np.float64 or b.dtype.kind in "iub":
                b = b.astype(np.float32)
            opts.baseline_tensor.CopyFrom(to_proto("baseline", b))
        return self._attribute("integrated_gradients", model, x, target, preprocess, on_progress, cancel,
                               integrated_gradients=opts, batch=check_int(batch, "batch", 0))

    def attribute(self, model, x, method: str, target=None, *, preprocess=None, on_progress=None, cancel=None,
                  **options: Any) -> Attribution:
        """Any method by name (``options``: the AttributionRequest's option messages / batch)."""
        return self._attribute(method, model, x, target, preprocess, on_progress, cancel, **options)

    def deconvnet(self, model, x, layer: str, *, top_k: int = 9, target=None, crop: bool = False,
                  rule_set: str = "deconvnet", preprocess=None, on_progress=None,
                  cancel=None) -> DeconvnetProjections:
        """Deconvnet projections (Zeiler & Fergus) of single units of ``layer``: the ``top_k``
        channels with the largest max activation, each at its argmax position; or ``target``: a
        channel index (int / list, one per image) or a ``Target.channel`` / ``Target.neuron``
        of ``layer``. ``crop`` also cuts each projection to the unit's receptive field."""
        from .client import Target, _check_name, _input_batch, _model_ref

        _check_name(layer, "layer")
        batch, inputs = _input_batch(x, preprocess, model)
        req = attribution_pb2.DeconvnetRequest(model=_model_ref(model), input=batch,
                                               layer=layer, top_k=check_int(top_k, "top_k", 1),
                                               crop=check_bool(crop, "crop"), rule_set=rule_set)
        if target is not None:
            if isinstance(target, (int, np.integer, list, tuple, np.ndarray)):
                target = Target.channel(layer, target)
            req.target.CopyFrom(target)
        res = self._stream(self._attribution_stub().Deconvnet, req, on_progress, cancel, inputs)
        t = res.tensors
        return DeconvnetProjections(layer=res.text.get("layer", layer), projections=t["projections"],
                                    channels=t["channels"], positions=t["positions"], activations=t["activations"],
                                    boxes=t["boxes"], crops=t.get("crops"), input=t.get("input"),
                                    text=dict(res.text), result=res)
