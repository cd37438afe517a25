"""Model config files (config.json / config.pbtxt) and preprocessing presets.

The schema is the API's own `ModelConfig` message, so a config reads the same in
a repository file (JSON or protobuf text, like Triton's config.pbtxt), in an
upload header and in `ModelInfo`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from ..errors import InvalidArgument
from ..gen import vis_pb2

CONFIG_FILES = ("config.json", "config.pbtxt")

# Presets name the conventions CNN families were trained with.
PRESETS: dict[str, dict] = {
    # torchvision: RGB in [0, 1], normalized per channel
    "imagenet": dict(color="RGB", value_range=(0.0, 1.0), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # Caffe / Caffe2: BGR in 0..255 minus the channel means
    "caffe": dict(color="BGR", value_range=(0.0, 255.0), mean=(103.94, 116.78, 123.68), std=(1.0, 1.0, 1.0)),
    # raw 0..255 pixels (no per-channel numbers: the colour follows the model's channels, GRAY or RGB)
    "raw255": dict(value_range=(0.0, 255.0), mean=(), std=()),
    # TensorFlow / Keras "inception" style: [-1, 1] (colour as for raw255)
    "tf": dict(value_range=(-1.0, 1.0), mean=(), std=()),
}

LAYOUTS = ("NCHW", "NHWC")
# Largest image side a config or request may ask for: a preprocessed float32 image of
# 8192 x 8192 x 3 is already 805 MB (without a bound, one request could exhaust memory).
MAX_IMAGE_SIDE = 8192
COLORS = ("RGB", "BGR", "GRAY")
RESIZES = ("center_crop", "stretch")
# value_range / mean / std: what a preprocessing could mean (pixels map into [lo, hi], then
# (v - mean) / std); past these, float32 images overflow and every method answers about "input".
MAX_CONFIG_VALUE = 1e6
MIN_STD = 1e-6


def read_config_file(model_dir: Path) -> vis_pb2.ModelConfig:
    """The config in `model_dir` (JSON or pbtxt), or an empty config if there is none.

    Never follows a link out of `model_dir` (nor echoes such a file's content in an error).
    """
    cfg = vis_pb2.ModelConfig()
    present = [fname for fname in CONFIG_FILES if (model_dir / fname).is_file()]
    if len(present) > 1:
        raise InvalidArgument("config", f"both {' and '.join(present)} exist in the model directory; keep one")
    for fname in present:
        path = model_dir / fname
        real = path.resolve()
        if real.parent != model_dir.resolve():
            raise InvalidArgument(f"config ({fname})", "is a link out of the model directory; refused")
        if real.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidArgument(f"config ({fname})", f"of {real.stat().st_size} bytes is over the "
                                                       f"{MAX_CONFIG_BYTES} bytes a config may take")
        try:
            text = real.read_text(encoding="utf-8-sig")   # a byte-order mark (Windows editors) is not content
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"config ({fname})", f"is not UTF-8 text (byte {exc.start})") from None
        try:
            if fname.endswith(".json"):
                if not text.lstrip().startswith("{"):   # protobuf's parser takes [] or a bare value as an empty config
                    raise ValueError("a config.json holds one JSON object, {...}")
                json_format.Parse(text, cfg)
            else:
                text_format.Parse(text, cfg)
        except Exception as exc:  # noqa: BLE001 - both parsers raise their own ParseError
            raise InvalidArgument(f"config ({fname})", f"cannot parse: {exc}") from None
    validate_config(cfg, field="config")
    return cfg


MAX_CONFIG_BYTES = 1 << 20


def validate_config(cfg: vis_pb2.ModelConfig, field: str = "config") -> None:
    if cfg.preset and cfg.preset not in PRESETS:
        raise InvalidArgument(f"{field}.preset", f"unknown preset {cfg.preset!r}; allowed: {', '.join(PRESETS)}")
    if cfg.label_offset < 0:
        raise InvalidArgument(f"{field}.label_offset", f"must be >= 0 (the class index of the labels' first line), "
                                                       f"got {cfg.label_offset}")
    validate_input_config(cfg.input, f"{field}.input")


def validate_input_config(ic: vis_pb2.InputConfig, field: str) -> None:
    if ic.layout and ic.layout not in LAYOUTS:
        raise InvalidArgument(f"{field}.layout", f"{ic.layout!r} not allowed; use one of {', '.join(LAYOUTS)}")
    if ic.color and ic.color not in COLORS:
        raise InvalidArgument(f"{field}.color", f"{ic.color!r} not allowed; use one of {', '.join(COLORS)}")
    if ic.resize and ic.resize not in RESIZES:
        raise InvalidArgument(f"{field}.resize", f"{ic.resize!r} not allowed; use one of {', '.join(RESIZES)}")
    if len(ic.size) not in (0, 2) or any(not 0 < s <= MAX_IMAGE_SIDE for s in ic.size):
        raise InvalidArgument(f"{field}.size", f"must be [H, W] with values in 1..{MAX_IMAGE_SIDE}")
    if not 0 <= ic.resize_short_side <= MAX_IMAGE_SIDE:
        raise InvalidArgument(f"{field}.resize_short_side",
                              f"must be in 1..{MAX_IMAGE_SIDE} (0 or absent: the size's short side x 256/224)")
    for name in ("value_range", "mean", "std"):
        if not all(math.isfinite(v) and abs(v) <= MAX_CONFIG_VALUE for v in getattr(ic, name)):
            raise InvalidArgument(f"{field}.{name}", f"values must be finite numbers of magnitude <= {MAX_CONFIG_VALUE:g}")
    if len(ic.value_range) not in (0, 2) or (len(ic.value_range) == 2 and ic.value_range[0] == ic.value_range[1]):
        raise InvalidArgument(f"{field}.value_range", "must be [lo, hi] with lo != hi")
    if any(abs(s) < MIN_STD for s in ic.std):
        raise InvalidArgument(f"{field}.std", f"values must be at least {MIN_STD:g} in magnitude (a std of ~0 "
                                              "turns every pixel into an overflow)")


@dataclass(frozen=True)
class ImageSpec:
    """Fully resolved preprocessing for one model input."""

    input_name: str
    layout: str
    color: str
    size: tuple[int, int]
    resize: str
    resize_short_side: int
    value_range: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    invert: bool

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3


def _merge(base: dict, ic: vis_pb2.InputConfig) -> dict:
    out = dict(base)
    for fd, value in ic.ListFields():
        out[fd.name] = tuple(value) if fd.is_repeated else value
    return out


def resolve_image_spec(cfg: vis_pb2.ModelConfig, request: vis_pb2.Preprocessing | None,
                       input_name: str, input_shape: tuple, field: str = "input.preprocess") -> ImageSpec:
    """Preset -> model config -> request overrides, filled in from the model input's shape.

    A request naming a preset replaces the model's config; its explicit fields
    override either.
    """
    if len(input_shape) not in (0, 4):
        # a 1-D (audio) or 3-D (video) CNN: told to give an image size, and given one, that the model
        # takes another rank
        raise InvalidArgument(field, f"model input {input_name!r} of shape {list(input_shape)} is not a 4-D image input "
                                     "[N, C, H, W] (or NHWC): images (files, encoded, or made by the server) need one; "
                                     "send the input as a tensor")
    if request is not None and request.preset:
        if request.preset not in PRESETS:
            raise InvalidArgument(f"{field}.preset", f"unknown preset {request.preset!r}; allowed: {', '.join(PRESETS)}")
        merged = dict(PRESETS[request.preset])
    else:
        merged = dict(PRESETS.get(cfg.preset, {}))
        merged = _merge(merged, cfg.input)
    if request is not None:
        validate_input_config(request.config, f"{field}.config")
        if request.config.name and request.config.name != input_name:
            raise InvalidArgument(f"{field}.config.name", f"{request.config.name!r}: the images go to input "
                                                          f"{input_name!r} (the model's config names the input)")
        merged = _merge(merged, request.config)
    layout, color, have_c = _layout_and_color(merged, input_name, input_shape, f"{field}.config")
    static = _spatial(input_shape, layout)
    size = tuple(merged.get("size") or static or ())
    if len(size) != 2:
        raise InvalidArgument(f"{field}.config.size", f"model input {input_name!r} has no static spatial size; give size [H, W]")
    if static and tuple(size) != tuple(static):
        # checked before any image is decoded or resized
        raise InvalidArgument(f"{field}.config.size", f"{list(size)} differs from the {list(static)} that input "
                                                      f"{input_name!r} takes; give that size or none")
    mean = tuple(float(v) for v in merged.get("mean", ()))
    std = tuple(float(v) for v in merged.get("std", ()))
    for name, vals in (("mean", mean), ("std", std)):
        if vals and len(vals) not in (1, have_c):
            allowed = "1 value" if have_c == 1 else f"1 or {have_c} values"
            raise InvalidArgument(f"{field}.config.{name}", f"needs {allowed} ({color}), got {len(vals)}")
    vr = tuple(float(v) for v in merged.get("value_range", ())) or (0.0, 1.0)
    short = int(merged.get("resize_short_side") or round(min(size) * 256 / 224))
    return ImageSpec(input_name, layout, color, (int(size[0]), int(size[1])), merged.get("resize") or "center_crop",
                     short, (vr[0], vr[1]), mean, std, bool(merged.get("invert", False)))


def _layout_and_color(merged: dict, input_name: str, input_shape: tuple, field: str) -> tuple[str, str, int]:
    """(layout, color, channels the color gives), checked against the input's channel axis."""
    layout = merged.get("layout") or _guess_layout(input_shape)
    want_c = _channels(input_shape, layout)
    if merged.get("layout") and isinstance(want_c, int) and want_c not in (1, 3):
        other = "NHWC" if layout == "NCHW" else "NCHW"
        raise InvalidArgument(f"{field}.layout", f"{layout} reads the channels of input {input_name!r} "
                                                 f"{_shape_text(input_shape)} from a dim of {want_c}; is it {other}?")
    color = merged.get("color") or ("GRAY" if want_c == 1 else "RGB")
    have_c = 1 if color == "GRAY" else 3
    if isinstance(want_c, int) and want_c != have_c:
        raise InvalidArgument(f"{field}.color", f"color {color} gives {have_c} channels but input {input_name!r} "
                                                f"{_shape_text(input_shape)} takes {want_c}")
    return layout, color, have_c


def check_config_input(cfg: vis_pb2.ModelConfig, input_name: str, input_shape: tuple | None, field: str = "config") -> None:
    """At load / upload: the config's layout, color and per-channel mean / std fit the image input (a
    wrong preset, or five means for three colours, fails here, not at every request). Image inputs
    only (rank 4); sizes may still come per request."""
    if input_shape is None or len(input_shape) != 4 or not (cfg.preset or cfg.input.layout or cfg.input.color
                                                            or cfg.input.mean or cfg.input.std):
        return
    merged = _merge(dict(PRESETS.get(cfg.preset, {})), cfg.input)
    _, color, have_c = _layout_and_color(merged, input_name, input_shape, f"{field}.input")
    for name in ("mean", "std"):
        values = merged.get(name, ())
        if values and len(values) not in (1, have_c):
            allowed = "1 value" if have_c == 1 else f"1 or {have_c} values"
            raise InvalidArgument(f"{field}.input.{name}", f"needs {allowed} ({color}), got {len(values)}")


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _guess_layout(shape: tuple) -> str:
    if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def _channels(shape: tuple, layout: str):
    if len(shape) != 4:
        return None
    return shape[1] if layout == "NCHW" else shape[3]


def _spatial(shape: tuple, layout: str):
    if len(shape) != 4:
        return None
    hw = shape[2:4] if layout == "NCHW" else shape[1:3]
    return hw if all(isinstance(d, int) for d in hw) else None
