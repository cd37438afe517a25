"""Encoded images (PNG/JPEG bytes) -> model input tensors, following an ImageSpec."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidArgument, ResourceExhausted
from .config import ImageSpec

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before decoding
MAX_BATCH_BYTES = 4 << 30       # preprocessed float32 images of one request, checked before decoding any


def decode_image(data: bytes, field: str) -> Image.Image:
    if not data:
        raise InvalidArgument(field, "empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise InvalidArgument(field, f"image of {img.width}x{img.height} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
        img.load()
    except InvalidArgument:
        raise
    except UnidentifiedImageError:  # its message names our in-memory buffer, nothing of use
        raise InvalidArgument(field, f"cannot decode image: not a format Pillow reads ({len(data)} bytes, "
                                     f"starting {data[:8]!r}); send PNG or JPEG bytes") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgument(field, f"cannot decode image ({exc}); send PNG or JPEG bytes") from None
    return img


def resize_image(img: Image.Image, spec: ImageSpec) -> Image.Image:
    h, w = spec.size
    if spec.resize == "stretch":
        return img.resize((w, h), Image.BILINEAR)
    # short side to resize_short_side, then centre crop (the torchvision recipe)
    scale = spec.resize_short_side / min(img.width, img.height)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    left, top = (nw - w) // 2, (nh - h) // 2
    if nw * nh > MAX_IMAGE_PIXELS:
        # a long thin image would resize to more pixels than any image may have: resample
        # only the crop's source box (the same window, without the huge intermediate)
        sx, sy = img.width / nw, img.height / nh
        return img.resize((w, h), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    img = img.resize((nw, nh), Image.BILINEAR)
    return img.crop((left, top, left + w, top + h))


def _eight_bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer greyscale (16-bit PNGs) as 8-bit: Pillow's convert() clips them to 255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        px = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(px / 257.0), 0, 255).astype(np.uint8), "L")
    return img


def image_to_array(img: Image.Image, spec: ImageSpec, field: str = "input.images") -> np.ndarray:
    """One image -> float32 [C, H, W] (or [H, W, C] for NHWC) as the model expects."""
    try:
        img = _eight_bit(img).convert("L" if spec.color == "GRAY" else "RGB")
    except ValueError as exc:   # modes Pillow decodes but cannot convert (e.g. CIELAB TIFFs)
        raise InvalidArgument(field, f"cannot convert a {img.mode} image to {spec.color} ({exc}); "
                                     "send RGB or greyscale PNG or JPEG bytes") from None
    img = resize_image(img, spec)
    px = np.asarray(img, dtype=np.float32)
    if px.ndim == 2:
        px = px[:, :, None]
    if spec.invert:
        px = 255.0 - px
    if spec.color == "BGR":
        px = px[:, :, ::-1]
    lo, hi = spec.value_range
    x = lo + px * ((hi - lo) / 255.0)
    if spec.mean:
        x = x - np.asarray(spec.mean, np.float32)
    if spec.std:
        x = x / np.asarray(spec.std, np.float32)
    x = x.astype(np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if spec.layout == "NCHW" else x)


def preprocess_images(images: list[bytes], spec: ImageSpec, field: str = "input.images") -> np.ndarray:
    need = len(images) * spec.size[0] * spec.size[1] * spec.channels * 4
    if need > MAX_BATCH_BYTES:
        raise ResourceExhausted(f"{field}: {len(images)} images of {spec.size[0]}x{spec.size[1]} would take {need} bytes "
                                f"preprocessed; at most {MAX_BATCH_BYTES} per request")
    arrays = [image_to_array(decode_image(b, f"{field}[{i}]"), spec, f"{field}[{i}]") for i, b in enumerate(images)]
    return np.stack(arrays, axis=0)
