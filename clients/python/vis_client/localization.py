"""Localization methods (CAM family, occlusion sensitivity).

Mixed into :class:`vis_client.Client`; uses its channel and stream helpers.

    cam = client.grad_cam("squeezenet", ["cat.png"], method="gradcam++")
    cam.render(0, "cat_gradcam.png")
    occ = client.occlusion("squeezenet", ["cat.png"], patch=32, stride=16)
    occ.render(0, "out/")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .arguments import check_int
from .gen import attribution_pb2
from .display import display_image, model_color
from .stream import Result
from .wire import make_stub

__all__ = ["LocalizationMixin", "Cam", "Occlusion", "CAM_METHODS", "OCCLUSION_FILLS"]

#: Methods of ``LocalizationService.Cam`` (see CamRequest.method).
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "guided_gradcam", "cam", "scorecam", "ablationcam")
#: Patch fills of ``LocalizationService.Occlusion``.
OCCLUSION_FILLS = ("grey", "zero", "mean")


def _ints(value, what: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, np.integer, Sequence, np.ndarray)):
        raise TypeError(f"{what} must be an int or [h, w], got {value!r}")   # '16' was (1, 6)
    if isinstance(value, (int, np.integer, bool, np.bool_)):
        return [check_int(value, what)]
    out = [check_int(v, what) for v in value]
    if len(out) not in (1, 2):
        raise ValueError(f"{what} must be an int or [h, w], got {value!r}")
    return out


@dataclass
class Cam:
    """Result of :meth:`LocalizationMixin.grad_cam`.

    ``cam`` [N, h, w] at the layer's resolution (>= 0); ``heatmap`` [N, H, W] upsampled to
    the input and scaled to [0, 1] per image; ``weights`` [N, C] channel weights; ``input``
    the preprocessed input; ``target_index`` [N] and its ``labels``; ``layer`` the tensor
    used; ``attribution`` (guided Grad-CAM only) input-shaped guided backprop x heat map;
    ``color`` the input's colour (for display); ``note`` names the images whose map is 0
    everywhere, and why (empty otherwise)."""
    cam: np.ndarray
    heatmap: np.ndarray
    weights: np.ndarray
    input: np.ndarray
    target_index: np.ndarray | None
    labels: list[str] | None
    layer: str
    method: str
    attribution: np.ndarray | None = None
    color: str = "RGB"
    result: Result = field(repr=False, default_factory=Result)
    note: str = ""

    def label(self, i: int) -> str:
        """``"class K (name)"`` of sample ``i``."""
        if self.target_index is None:
            return ""
        k = int(self.target_index[i])
        name = self.labels[i] if self.labels and i < len(self.labels) and self.labels[i] else ""
        return f"class {k}" + (f" ({name})" if name else "")

    def peak(self, i: int) -> tuple[int, int]:
        """(y, x) of the heat map's maximum in input pixels."""
        h = self.heatmap[i]
        y, x = np.unravel_index(int(np.argmax(h)), h.shape)
        return int(y), int(x)

    def render(self, i: int, path: str | os.PathLike | None = None, *, cmap: str = "jet",
               alpha: float = 0.5) -> np.ndarray:
        """Overlay heat map ``i`` on the input it was computed for, with a colour bar; writes a
        PNG when ``path`` is given and returns the image."""
        from . import render

        img = display_image(self.input[i], self.color)
        return render.heatmap_overlay(img, self.heatmap[i], path, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0,
                                      label=self.method)


@dataclass
class Occlusion:
    """Result of :meth:`LocalizationMixin.occlusion` (maps are [N, rows, cols] over patch positions).

    ``probability``: target-class probability with the patch at each position;
    ``feature``: total activation of feature map ``feature_channel[n]`` of ``layer`` (the
    strongest on the unoccluded image); ``top_class`` (+ ``top_class_labels``, [N][rows][cols]):
    most probable class; ``probability_unoccluded`` [N]; ``patch`` / ``stride`` as (h, w);
    ``fill`` the patch fill used; ``color`` the input's colour (for display)."""
    probability: np.ndarray
    feature: np.ndarray
    feature_channel: np.ndarray
    top_class: np.ndarray
    top_class_labels: list | None
    probability_unoccluded: np.ndarray
    target_index: np.ndarray
    labels: list[str] | None
    input: np.ndarray
    layer: str
    patch: tuple[int, int]
    stride: tuple[int, int]
    fill: str
    color: str = "RGB"
    result: Result = field(repr=False, default_factory=Result)

    def label(self, i: int) -> str:
        k = int(self.target_index[i])
        name = self.labels[i] if self.labels and i < len(self.labels) and self.labels[i] else ""
        return f"class {k}" + (f" ({name})" if name else "")

    def most_sensitive(self, i: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) input box of the patch that lowers the probability most."""
        p = self.probability[i]
        r, c = np.unravel_index(int(np.argmin(p)), p.shape)
        top, left = int(r) * self.stride[0], int(c) * self.stride[1]
        return top, left, top + self.patch[0], left + self.patch[1]

    def render(self, i: int, directory: str | os.PathLike, stem: str = "occlusion", *,
               alpha: float = 0.5) -> dict[str, Path]:
        """Write three PNGs for sample ``i`` into ``directory``: the probability and feature maps
        as heat maps over the input (with colour bars), and the most-probable-class map coloured
        by class with a legend of label names. Returns name -> path. A ``directory`` ending in
        ``.png`` is taken as the stem's place: ``out/occ.png`` writes ``out/occ_probability.png`` ..."""
        from . import render

        out = Path(directory)
        if out.suffix.lower() == ".png":
            out, stem = out.parent, out.stem
        render.require_matplotlib()   # before the directory is made (an empty one was left behind)
        out.mkdir(parents=True, exist_ok=True)
        img = display_image(self.input[i], self.color)
        paths = {"probability": out / f"{stem}_probability.png", "feature": out / f"{stem}_feature.png",
                 "top_class": out / f"{stem}_top_class.png"}
        # each map value belongs to the patch centre: nearest-upsample the grid onto the patch centres' cells
        render.heatmap_overlay(img, self._on_image(self.probability[i], img.shape[:2]), paths["probability"],
                               alpha=alpha, vmin=0.0, vmax=1.0, label=f"p({self.label(i)})"[:40])
        render.heatmap_overlay(img, self._on_image(self.feature[i], img.shape[:2]), paths["feature"],
                               alpha=alpha, label=f"map {int(self.feature_channel[i])} total")
        self._class_map(i, img, paths["top_class"])
        return paths

    def _on_image(self, grid: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Spread a [rows, cols] grid over the image: each pixel takes the value of the nearest
        patch centre (NaN-free, so the overlay's colour scale is the grid's)."""
        rows, cols = grid.shape
        cy = np.arange(rows) * self.stride[0] + self.patch[0] / 2.0
        cx = np.arange(cols) * self.stride[1] + self.patch[1] / 2.0
        ry = np.abs(np.arange(hw[0])[:, None] + 0.5 - cy[None]).argmin(axis=1)
        rx = np.abs(np.arange(hw[1])[:, None] + 0.5 - cx[None]).argmin(axis=1)
        return grid[ry][:, rx]

    def _class_map(self, i: int, img: np.ndarray, path: Path) -> None:
        from . import render

        render._mpl()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        grid = self.top_class[i]
        classes = list(dict.fromkeys(int(k) for k in grid.reshape(-1)))
        names = {}
        flat_labels = _flatten(self.top_class_labels[i]) if self.top_class_labels else None
        for j, k in enumerate(grid.reshape(-1)):
            names.setdefault(int(k), (flat_labels[j] if flat_labels else "") or "")
        cmap = render._mpl().colormaps["tab20"]
        index = {k: j for j, k in enumerate(classes)}
        colours = np.array([cmap(index[int(k)] % 20)[:3] for k in grid.reshape(-1)]).reshape(*grid.shape, 3)
        fig = Figure(figsize=(6, 4), dpi=100, facecolor="white")
        FigureCanvasAgg(fig)
        ax = fig.add_axes([0.02, 0.05, 0.55, 0.9])
        ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0))
        ax.imshow(self._on_image_rgb(colours, img.shape[:2]), alpha=0.55, extent=(0, img.shape[1], img.shape[0], 0))
        ax.set_axis_off()
        ax.set_title("most probable class per patch position", fontsize=8)
        handles = [Patch(color=cmap(index[k] % 20)[:3], label=f"{k} {names.get(k, '')}".strip()[:30])
                   for k in classes[:20]]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.6, 0.5), fontsize=7, frameon=False)
        fig.canvas.draw()
        render.save_png(np.asarray(fig.canvas.buffer_rgba())[..., :3], path)

    def _on_image_rgb(self, colours: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        return np.stack([self._on_image(colours[..., j], hw) for j in range(3)], axis=-1)


def _flatten(labels) -> list[str]:
    if isinstance(labels, str):
        return [labels]
    out: list[str] = []
    for v in labels:
        out.extend(_flatten(v))
    return out


class LocalizationMixin:
    """Client methods for ``LocalizationService`` (proto/vis/v1/attribution.proto)."""

    def _localization(self):
        stub = getattr(self, "_localization_stub", None)
        if stub is None:
            stub = self._localization_stub = make_stub(self._channel, attribution_pb2.DESCRIPTOR.services_by_name["LocalizationService"])
        return stub

    def grad_cam(self, model, x, target=None, *, layer: str | None = None, method: str = "gradcam", batch: int = 0,
                 preprocess=None, on_progress: Callable[[Any], Any] | None = None, cancel=None) -> Cam:
        """A class activation map per image.

        ``method``: one of :data:`CAM_METHODS` ("gradcam" default). ``target``: class index,
        list of indices, ``None`` (top-1) or a ``Target`` message (gradient variants accept
        channel / neuron targets too). ``layer``: a 4-D feature tensor or node name (default:
        the last feature map before the global pooling). ``batch``: masked inputs per run for
        Score-CAM / ablated maps per run for Ablation-CAM (0 = server default)."""
        from .client import _input_batch, _model_ref, build_target

        if not isinstance(method, str) or not method:
            raise TypeError("method must be a non-empty string")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TypeError("layer must be a non-empty string or None")
        batch = check_int(batch, "batch", 0)
        batch_in, inputs = _input_batch(x, preprocess, model)
        req = attribution_pb2.CamRequest(model=_model_ref(model), input=batch_in,
                                         target=build_target(target), method=method, layer=layer or "",
                                         batch=batch)
        res = self._stream(self._localization().Cam, req, on_progress, cancel, inputs)
        t = res.tensors
        return Cam(cam=t["cam"], heatmap=t["heatmap"], weights=t["weights"], input=t["input"],
                   target_index=t.get("target_index"), labels=res.labels.get("target_index"),
                   layer=res.text.get("layer", ""), method=res.text.get("method", method),
                   note=res.text.get("note", ""), attribution=t.get("attribution"), color=model_color(model),
                   result=res)

    def score_cam(self, model, x, target=None, **kwargs) -> Cam:
        """Score-CAM (input masked by each upsampled feature map); see :meth:`grad_cam`."""
        return self.grad_cam(model, x, target, method="scorecam", **kwargs)

    def occlusion(self, model, x, target=None, *, patch: int | Sequence[int] | None = None,
                  stride: int | Sequence[int] | None = None, fill: str = "grey", layer: str | None = None,
                  batch: int = 32, preprocess=None, on_progress: Callable[[Any], Any] | None = None,
                  cancel=None) -> Occlusion:
        """Occlusion sensitivity (Zeiler & Fergus): slide a ``fill`` patch ("grey", "zero" or
        "mean") of size ``patch`` (int or (h, w); default a quarter of the smaller image side)
        with ``stride`` (default half the patch); ``batch`` occluded images per run. Besides the
        target-class probability per patch position, the feature map (Zeiler & Fergus's (b)): the
        total activation, at ``layer`` (default: the CAM default layer), of the channel strongest on
        the unoccluded image."""
        from .client import _input_batch, _model_ref, build_target

        if not isinstance(fill, str) or not fill:
            raise TypeError("fill must be a non-empty string")
        batch = check_int(batch, "batch", 0)
        batch_in, inputs = _input_batch(x, preprocess, model)
        req = attribution_pb2.OcclusionRequest(model=_model_ref(model), input=batch_in,
                                               target=build_target(target), patch=_ints(patch, "patch"),
                                               stride=_ints(stride, "stride"), fill=fill, layer=layer or "",
                                               batch=int(batch))
        res = self._stream(self._localization().Occlusion, req, on_progress, cancel, inputs)
        t = res.tensors
        top = t["top_class"]
        flat = res.labels.get("top_class")
        top_labels = np.asarray(flat, dtype=object).reshape(top.shape).tolist() if flat else None
        s = res.scalars
        return Occlusion(probability=t["probability"], feature=t["feature"], feature_channel=t["feature_channel"],
                         top_class=top, top_class_labels=top_labels,
                         probability_unoccluded=t["probability_unoccluded"], target_index=t["target_index"],
                         labels=res.labels.get("target_index"), input=t["input"], layer=res.text.get("layer", ""),
                         patch=(int(s.get("patch_h", 0)), int(s.get("patch_w", 0))),
                         stride=(int(s.get("stride_h", 0)), int(s.get("stride_w", 0))),
                         fill=res.text.get("fill", fill), color=model_color(model), result=res)
