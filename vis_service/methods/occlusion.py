"""Occlusion sensitivity (Zeiler & Fergus 2014, section 4.2).

A patch (grey, zero or the image's channel mean) is slid over the image; for
every position the occluded image is classified and three maps are recorded:

(a) "probability": the target class's probability, as the model makes it (targets.class_probabilities:
    its Softmax / LogSoftmax / Sigmoid; a single logit's sigmoid; per position for dense outputs);
(b) "feature": the total activation (sum over positions) of one feature map of
    `layer`, the one strongest (by total activation) on the unoccluded image;
(c) "top_class": the most probable class (at the target's position for dense outputs), with its
    label names.

Positions: top = r * stride_h for r in 0 .. (H - patch_h) // stride_h (same for
columns), so every patch lies inside the image. The occluded copies of all
images are stacked and classified `batch` at a time in one cached session that
exposes both the class scores and the layer, never one run per patch; progress
(patches done / total) is reported per batch and the loop stops on cancel.

Where the network's first layers are local (graph.local_head), each occluded image
recomputes only the units of a cut tensor that the patch reaches, from a crop of the
image, then those of a later cut from a crop of the first, and so on, and replays the
rest of the network from the last cut (ResNet-50, 32x32 patches at stride 16: layer1.0
from 72x72 image crops, layer1.2 from 21x21 of layer1.0's 56x56 units, then every block of
layer2 and layer3.0 / 3.1 from crops of the block before, 13x13 to 21x21 of 28x28 or 14x14;
4.7-5.1 s per image with none, 3.7-4.2 s with three greedily planned cuts, 3.2 s with these:
local_head.plan_local_cuts searches the chain). The unoccluded images run through the same
heads and tail, so no session of the whole network is built for occlusion.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from ..errors import InvalidArgument
from ..models.inputs import image_dims_at, shapes_at_sizes, static_sizes
from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from ..graph import local_head
from ..graph.local_head import LocalCut, head_model, plan_local_cuts
from ..graph.names import resolve_tensor
from ..graph.subgraph import graph_after
from .cam import (DEFAULT_BATCH, CamContext, class_indices, default_layer, forward_tensors,
                  image_layout, input_spec, spatial_size)
from . import batching
from .gradient import Objective, objective_tensor_name, require_finite
from .progress import NO_PROGRESS, MethodResult, Progress
from .targets import (class_probabilities, require_activation, require_batch_first, require_channels_first,
                      require_from_image, require_rows)

log = logging.getLogger(__name__)

FILLS = ("grey", "zero", "mean")
MID_GREY = 127.5  # pixel value (0..255) of the grey patch


def _pair(values: Sequence[int], field: str, default: tuple[int, int]) -> tuple[int, int]:
    values = [int(v) for v in values]
    if not values:
        return default
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise InvalidArgument(field, f"give [size] or [h, w], got {len(values)} values")
    if any(v <= 0 for v in values):
        raise InvalidArgument(field, f"must be positive, got {values}")
    return values[0], values[1]


def grey_value(model: LoadedModel, preprocess, channels: int, shape: tuple | None = None) -> np.ndarray:
    """Model-space value of a mid-grey pixel per channel, from the preprocessing config (`shape`:
    the images', for a model whose image size is free)."""
    spec = input_spec(model, preprocess, shape)
    if spec is None:
        raise InvalidArgument("fill", "'grey' needs the model's preprocessing (its config or input.preprocess); "
                                      "use 'zero' or 'mean'")
    lo, hi = spec.value_range
    v = lo + (hi - lo) * MID_GREY / 255.0  # 255 - 127.5 = 127.5: inversion does not change it
    mean = np.asarray(spec.mean or (0.0,), dtype=np.float64)
    std = np.asarray(spec.std or (1.0,), dtype=np.float64)
    return np.broadcast_to((v - mean) / std, (channels,)).copy()


def fill_values(x: np.ndarray, fill: str, layout: str, model: LoadedModel, preprocess) -> np.ndarray:
    """[N, C] patch value per image and channel."""
    ch_axis = 3 if layout == "NHWC" else 1
    n, c = x.shape[0], x.shape[ch_axis]
    if fill == "grey":
        return np.broadcast_to(grey_value(model, preprocess, c, x.shape), (n, c)).copy()
    if fill == "zero":
        return np.zeros((n, c))
    if fill == "mean":
        axes = (1, 2) if layout == "NHWC" else (2, 3)
        return x.astype(np.float64).mean(axis=axes)
    raise InvalidArgument("fill", f"unknown fill {fill!r}; allowed: {', '.join(FILLS)}")


def _top_classes(p: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each row's most probable class: over all its entries, or for [N, classes, ...] scores per
    position (dense prediction) over the classes at the position of its target entry."""
    if p.ndim < 3:
        return p.reshape(len(p), -1).argmax(axis=1)
    per_class = p.reshape(len(p), p.shape[1], -1)
    return per_class[np.arange(len(p)), :, targets % per_class.shape[2]].argmax(axis=1)


def occlusion_positions(hw: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int]):
    rows = (hw[0] - patch[0]) // stride[0] + 1
    cols = (hw[1] - patch[1]) // stride[1] + 1
    return rows, cols


def occlude(x: np.ndarray, values: np.ndarray, top: int, left: int, patch: tuple[int, int], layout: str) -> np.ndarray:
    """A copy of one image [C, H, W] / [H, W, C] with the patch filled with `values` [C]."""
    out = x.copy()
    ph, pw = patch
    if layout == "NHWC":
        out[top:top + ph, left:left + pw, :] = values
    else:
        out[:, top:top + ph, left:left + pw] = values[:, None, None]
    return out


def compute_occlusion(runtime: Runtime, model: LoadedModel, feeds: dict[str, np.ndarray],
                      objective: Objective | None = None, patch: Sequence[int] = (), stride: Sequence[int] = (),
                      fill: str = "grey", layer: str = "", batch: int = 0, preprocess=None,
                      progress: Progress = NO_PROGRESS) -> MethodResult:
    objective = objective or Objective()
    fill = fill or "grey"
    if fill not in FILLS:
        raise InvalidArgument("fill", f"unknown fill {fill!r}; allowed: {', '.join(FILLS)}")
    if batch < 0:
        raise InvalidArgument("batch", f"must be >= 0 (0 = default {DEFAULT_BATCH}), got {batch}")
    batch = batching.run_size(model, batch or DEFAULT_BATCH)
    if objective.kind != "output":
        raise InvalidArgument("target", f"occlusion needs a class (output) target, got a {objective.kind} target")
    x = feeds[model.image_input]
    layout = image_layout(model, x, preprocess)
    hw = spatial_size(x, layout)
    default_patch = max(1, min(hw) // 4)
    ph, pw = _pair(patch, "patch", (default_patch, default_patch))
    if ph > hw[0] or pw > hw[1]:
        raise InvalidArgument("patch", f"patch {[ph, pw]} is larger than the image {list(hw)}")
    sh, sw = _pair(stride, "stride", (max(1, ph // 2), max(1, pw // 2)))
    scores_t = objective_tensor_name(model, objective)
    require_batch_first(model, scores_t, "target", objective.layer)
    if layer:
        layer_t = resolve_tensor(model.proto, layer, kind="layer")
        require_activation(model, layer_t, "layer", layer)
        require_from_image(model, layer_t, "layer", layer)
        require_channels_first(model, layer_t, "layer", layer)
        info = model.infos.get(layer_t)
        if info is None or info.shape is None or len(info.shape) < 2:
            raise InvalidArgument("layer", f"{layer!r} has no channel axis (shape "
                                           f"{None if info is None else info.shape}); name a feature map [N, C, ...]")
    else:
        layer_t = default_layer(model, objective_tensor_name(model, Objective("output", objective.layer))).layer
    values = fill_values(x, fill, layout, model, preprocess)

    cuts: list[LocalCut] = []
    static = model.infos[model.image_input].shape
    # a free image size: the cuts are planned on the graph specialized to these images' size (the
    # heads leave their crops' size open and the tail its input's, so they run on the model as it is)
    sizes = static_sizes(model, {model.image_input: x.shape})
    if sizes:
        static = image_dims_at(model, x.shape)
    # (the heads and tail are built for a free batch: a fixed one runs the whole network per patch)
    if static and len(static) == 4 and set(feeds) == {model.image_input} and not batching.fixed_batch(model) and \
            tuple(static[1:3] if layout == "NHWC" else static[2:]) == tuple(hw):
        cuts = model.memo_per("occlusion_cuts", (scores_t, layer_t, (ph, pw), (sh, sw), layout,
                                                 local_head.CUT_COST_MACS, sizes),
                              lambda: _plan_cuts(model, [scores_t, layer_t], (ph, pw), (sh, sw), layout, sizes))
    # unoccluded images: target class, strongest feature map, reference probability (and the cuts)
    ctx = CamContext(runtime, model, feeds, layer_t, objective, layout, batch, progress)
    # an NHWC image starts the cuts from its NCHW view (nchw_source): made once per call
    x_cut = (x if cuts[0].source == model.image_input else np.ascontiguousarray(x.transpose(0, 3, 1, 2))) \
        if cuts else None
    base = (_clean_through_cuts(ctx, cuts, x_cut, [scores_t, layer_t]) if cuts
            else forward_tensors(ctx, feeds, [scores_t, layer_t]))
    for t in (scores_t, layer_t):  # (forward_tensors checks its own; the cuts' runs are checked here)
        require_finite(f"tensor {t!r}", base[t])
    n = x.shape[0]
    idx = class_indices(ctx, base[scores_t], scores_t)
    probs0 = class_probabilities(model, scores_t, base[scores_t]).reshape(n, -1)
    totals0 = base[layer_t].reshape(n, base[layer_t].shape[1], -1).astype(np.float64).sum(axis=2)
    channel = totals0.argmax(axis=1).astype(np.int64)

    rows, cols = occlusion_positions(hw, (ph, pw), (sh, sw))
    per_image = rows * cols
    total = n * per_image
    prob_map = np.zeros(total)
    feat_map = np.zeros(total)
    top_map = np.zeros(total, dtype=np.int64)
    progress.update(0, total, "patches")
    for start in range(0, total, batch):
        stop = min(total, start + batch)
        items = np.arange(start, stop)
        img, pos = np.divmod(items, per_image)
        r, c = np.divmod(pos, cols)
        if cuts:
            out = _forward_through_cuts(ctx, cuts, base, x_cut, values, img, r, c, (ph, pw), (sh, sw),
                                        [scores_t, layer_t])
            require_rows(scores_t, out[scores_t], len(items))
        else:
            occluded = np.stack([occlude(x[i], values[i], rr * sh, cc * sw, (ph, pw), layout)
                                 for i, rr, cc in zip(img, r, c)]).astype(x.dtype)
            run_feeds = batching.row_feeds(model, feeds, img, occluded)
            out = forward_tensors(ctx, run_feeds, [scores_t, layer_t])
            require_rows(scores_t, out[scores_t], len(run_feeds[model.image_input]))
            out = {t: v[:len(items)] for t, v in out.items()}  # without a fixed batch's padding
        p = class_probabilities(model, scores_t, out[scores_t])
        prob_map[start:stop] = p.reshape(len(items), -1)[np.arange(len(items)), idx[img]]
        top_map[start:stop] = _top_classes(p, idx[img])
        act = out[layer_t]
        feat_map[start:stop] = act[np.arange(len(items)), channel[img]].reshape(len(items), -1).astype(np.float64).sum(axis=1)
        progress.update(stop, total, "patches")

    require_finite(f"tensor {scores_t!r} or {layer_t!r} of an occluded image", np.stack([prob_map, feat_map]))
    shape = (n, rows, cols)
    tensors = {
        "probability": prob_map.reshape(shape).astype(np.float32),
        "feature": feat_map.reshape(shape).astype(np.float32),
        "feature_channel": channel,
        "top_class": top_map.reshape(shape),
        "probability_unoccluded": probs0[np.arange(n), idx].astype(np.float32),
        "target_index": idx,
        "input": x,
    }
    labels = {}
    if model.labels:
        labels["top_class"] = [model.label(int(i)) or "" for i in top_map]
        labels["target_index"] = [model.label(int(i)) or "" for i in idx]
    text = {"layer": layer_t, "fill": fill, "patch": f"{ph}x{pw}", "stride": f"{sh}x{sw}",
            "recomputed": ("; ".join(f"{cut.tensor} from {cut.crop[0]}x{cut.crop[1]} crops of {cut.source}"
                                     for cut in cuts) + "; the rest of the network from the last"
                           if cuts else "the whole network per patch")}
    return MethodResult(tensors, {"patch_h": ph, "patch_w": pw, "stride_h": sh, "stride_w": sw}, labels, text)


def _plan_cuts(model: LoadedModel, outputs: list[str], patch: tuple[int, int], stride: tuple[int, int],
               layout: str, sizes: tuple = ()) -> list[LocalCut]:
    """The chain of local cuts, or none where planning fails: the cuts only save time, the
    whole network per patch gives the same maps. `sizes`: the images' (models.inputs.static_sizes)
    where the model's image size is free; planning reads shapes only (a weightless graph)."""
    try:
        proto = shapes_at_sizes(model, sizes) if sizes else model.proto
        return plan_local_cuts(proto, model.image_input, outputs, patch, stride, layout)
    except Exception as exc:  # noqa: BLE001 - an unforeseen graph shape must not fail the method
        log.warning("occlusion of %s runs the whole network per patch: planning local cuts failed (%s: %s)",
                    model.id, type(exc).__name__, exc)
        return []


def _paste(dst: np.ndarray, dst_origin: tuple[int, int], src: np.ndarray, src_origin: tuple[int, int],
           rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """dst[..., u, v] = src[..., u, v] for the tensor units u in rows, v in cols (inclusive), where
    index 0 of dst / src is unit dst_origin / src_origin; units outside dst are skipped."""
    (r0, c0), (s0, t0) = dst_origin, src_origin
    lo_r, hi_r = max(rows[0], r0), min(rows[1], r0 + dst.shape[-2] - 1)
    lo_c, hi_c = max(cols[0], c0), min(cols[1], c0 + dst.shape[-1] - 1)
    if lo_r <= hi_r and lo_c <= hi_c:
        dst[..., lo_r - r0:hi_r - r0 + 1, lo_c - c0:hi_c - c0 + 1] = \
            src[..., lo_r - s0:hi_r - s0 + 1, lo_c - t0:hi_c - t0 + 1]


def _forward_through_cuts(ctx: CamContext, cuts: list[LocalCut], clean: dict[str, np.ndarray], x: np.ndarray,
                          values: np.ndarray, img: np.ndarray, r: np.ndarray, c: np.ndarray,
                          patch: tuple[int, int], stride: tuple[int, int], outputs: list[str]) -> dict[str, np.ndarray]:
    """`outputs` for the occluded images (image img[k], patch at row r[k], column c[k] of the
    grid): each cut's head on crops of its source (the occluded image `x`, NCHW; then the clean
    source with the units the cut before changed), the last cut's changed units pasted into its
    clean tensor `clean[...]`, the tail from there."""
    changed = None  # the previous head's output, and the crop origins (in its units) per row
    for level, cut in enumerate(cuts):
        head = _head_session(ctx, cut)
        source = x if level == 0 else clean[cut.source]
        (crop_h, crop_w), spans = cut.crop, [(cut.spans[0][rr], cut.spans[1][cc]) for rr, cc in zip(r, c)]
        crops = np.empty((len(img), source.shape[1], crop_h, crop_w), source.dtype)
        for k, (i, (along_h, along_w)) in enumerate(zip(img, spans)):
            crops[k] = source[i, :, along_h.start:along_h.start + crop_h, along_w.start:along_w.start + crop_w]
            if changed is None:
                # the patch in crop coordinates; its part outside the crop reaches no changed unit
                top, left = r[k] * stride[0] - along_h.start, c[k] * stride[1] - along_w.start
                crops[k, :, max(top, 0):max(top + patch[0], 0), max(left, 0):max(left + patch[1], 0)] = \
                    values[i][:, None, None]
            else:
                prev, origins, prev_spans = changed
                _paste(crops[k], (along_h.start, along_w.start), prev[k], origins[k],
                       (prev_spans[k][0].lo, prev_spans[k][0].hi), (prev_spans[k][1].lo, prev_spans[k][1].hi))
        origins = [(h.start // cut.jump[0], w.start // cut.jump[1]) for h, w in spans]
        changed = (head.run([cut.tensor], {cut.source: crops})[0], origins, spans)
    last = cuts[-1]
    prev, origins, spans = changed
    pasted = clean[last.tensor][img]  # a copy per row
    for k, (along_h, along_w) in enumerate(spans):
        _paste(pasted[k], (0, 0), prev[k], origins[k], (along_h.lo, along_h.hi), (along_w.lo, along_w.hi))
    return _tail_session(ctx, last, outputs).run_dict(outputs, {last.tensor: pasted})


def _clean_through_cuts(ctx: CamContext, cuts: list[LocalCut], x: np.ndarray,
                        outputs: list[str]) -> dict[str, np.ndarray]:
    """`outputs` and every cut tensor of the unoccluded images `x` (NCHW), from the heads run on the whole
    tensors and the tail: the sessions the patches use, so no session of the whole network is
    built (on a first call that halves the sessions to build) and the clean cut tensors come
    from the very kernels their crops do."""
    values, current = {}, x
    for cut in cuts:
        current = values[cut.tensor] = _head_session(ctx, cut).run([cut.tensor], {cut.source: current})[0]
    values.update(_tail_session(ctx, cuts[-1], outputs).run_dict(outputs, {cuts[-1].tensor: current}))
    return values


def _head_session(ctx: CamContext, cut: LocalCut):
    model = ctx.model
    return ctx.runtime.session(model.graph_id, ("local_head", cut.source, cut.tensor),
                               lambda: (head_model(model.proto, cut), None))


def _tail_session(ctx: CamContext, last: LocalCut, outputs: list[str]):
    def build():  # the same key and meta as Ablation-CAM's replays (cam.py)
        sub = graph_after(ctx.model.proto, last.tensor, outputs)
        return sub.model, sub

    return ctx.runtime.session(ctx.model.graph_id, ("after", last.tensor, tuple(outputs)), build)
