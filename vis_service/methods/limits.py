"""Request values checked against the server's limits.

A value over a limit is RESOURCE_EXHAUSTED (the request is well formed, the server will not
spend that much on it); a value that is never allowed (negative, not a number) stays
INVALID_ARGUMENT where the caller checks it. Messages name the field and the limit.
"""
from __future__ import annotations

import math
import os

from ..errors import InvalidArgument, ResourceExhausted
from ..graph.loading import too_small
from ..graph.receptive_field import image_input
from ..graph.weights import activation_bytes_per_input_byte
from ..models.inputs import shapes_at_sizes, static_sizes

# the server's --max-batch default; library callers without a server get the same bound
DEFAULT_SERVER_MAX_BATCH = 256
GiB = 1 << 30
# where the machine's memory cannot be read
FALLBACK_MEMORY_BYTES = 64 * GiB


def check_batch(field: str, value: int, limit: int, what: str) -> int:
    """`value` (already >= 0) at most the server's `limit` (--max-batch); `what` names its unit."""
    if value > limit:
        raise ResourceExhausted(f"{field}: {value} {what} exceeds the server's limit of {limit} (--max-batch)")
    return value


def physical_memory_bytes() -> int:
    """The machine's physical memory: a memory budget above it can never be honoured."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY_BYTES


def check_memory_budget(field: str, value: int) -> int:
    """An explicit memory budget (bytes, already >= 0) at most the server's physical memory."""
    limit = physical_memory_bytes()
    if value > limit:
        raise ResourceExhausted(f"{field}: {value} bytes exceeds the server's physical memory of {limit} bytes "
                                f"({limit / GiB:.1f} GiB)")
    return value


# float64 arrays of the image's size an optimization loop holds at once (parameters, the optimizer's
# two moments and its update, the image and its transformed copy, the model input and its gradient,
# their adjoints, regularizer terms): bytes per image value, onnxruntime's own tensors not counted
OPTIMIZATION_BYTES_PER_VALUE = 12 * 8


def check_optimization_memory(field: str, images: int, image_shape: tuple[int, ...], what: str) -> int:
    """The bytes an optimization loop over `images` images of `image_shape` (C, H, W) holds, at most the
    server's physical memory (RESOURCE_EXHAUSTED naming `field` above it), checked before any is
    allocated: a model's static input size is not bounded by the request limits."""
    values = int(images) * math.prod(int(d) for d in image_shape)
    need = values * OPTIMIZATION_BYTES_PER_VALUE
    limit = physical_memory_bytes()
    if need > limit:
        size = "x".join(str(int(d)) for d in image_shape)
        raise ResourceExhausted(f"{field}: {images} {what} of {size} need about {need / GiB:.1f} GiB in the "
                                f"optimization loop, more than the server's physical memory ({limit / GiB:.1f} GiB); "
                                "use fewer, or a model with a smaller input")
    return need


# the typical image side of a free-size model: where its activations per input byte are measured, and
# its gradient support checked (gradient.representative_sizes) when its config gives no size
REFERENCE_SIDE = 224


# what a gradient run of a free-size model took, measured, per byte of its activation estimate
# (SqueezeNet at 4096 x 4096: 10.3 GB against 8.8 GiB estimated)
RUN_BYTES_PER_ESTIMATED_BYTE = 1.25


def free_size_image_bytes(model, x) -> int | None:
    """Estimated bytes of one image's activations in a run of a model whose image size is free (the
    input's bytes times the activations per input byte at 224 x 224, `graph.weights.
    activation_bytes_per_input_byte`: every tensor of a run, what a backward run keeps); None for a
    model of fixed image size or where no estimate exists."""
    found = model.memo("image_input_axes", lambda: image_input(model.proto, model.infos))
    if found is None or x is None or x.ndim != 4:
        return None
    name, axes = found
    shape = model.infos[name].shape
    if all(isinstance(shape[a], int) for a in axes):
        return None   # a fixed image size: the run's memory is that of the model's shapes
    ratio = model.memo("activation_bytes_per_input_byte", lambda: activation_bytes_per_input_byte(
        model.proto, name, (REFERENCE_SIDE, REFERENCE_SIDE), axes))
    return None if ratio is None else int(ratio * x[:1].nbytes)


def check_free_size_input(model, feeds: dict, field: str = "input", images: int = 1) -> None:
    """RESOURCE_EXHAUSTED naming `field` when a model whose image size is free (symbolic height /
    width) gets images one of which would take, in a run, more than half of the machine's memory
    (`free_size_image_bytes` times RUN_BYTES_PER_ESTIMATED_BYTE): two runs go at once by default
    (--max-concurrent-runs), beside the cached sessions. A 91-byte PNG with preprocess size 8192 x
    8192 took a small ResNet to 8 GB; a SqueezeNet at 5600 x 5600 (estimated 16 GiB, under the
    whole memory that was the bound) had the kernel kill the server. `images`: how many of them one
    run takes together (activation maximization runs its whole batch at once)."""
    found = model.memo("image_input_axes", lambda: image_input(model.proto, model.infos))
    if found is None or found[0] not in feeds:
        return
    x = feeds[found[0]]
    one = free_size_image_bytes(model, x)
    if one is None:
        return
    need = one * RUN_BYTES_PER_ESTIMATED_BYTE * max(1, images)
    limit = physical_memory_bytes() / 2
    if need > limit:
        axes = found[1]
        what = "an image" if images <= 1 else f"{images} images"
        verb = "takes" if images <= 1 else "take"
        raise ResourceExhausted(f"{field}: {what} of {x.shape[axes[0]]} x {x.shape[axes[1]]} {verb} an estimated "
                                f"{need / GiB:.1f} GiB in a run of this model (its image size is free), over half "
                                f"of the server's memory ({limit / GiB:.1f} GiB of {2 * limit / GiB:.1f}): send "
                                "smaller images")


def check_input_fits(model, shapes: dict, field: str = "input") -> None:
    """INVALID_ARGUMENT naming `field` when inputs of these shapes ({input: shape}) are too small for a
    model whose input size is free: shape inference at their sizes (on the graph without its weights,
    once per size) leaves a feature map empty. Checked before any run: onnxruntime's optimized
    kernels divide by such sizes (a free-size SqueezeNet fed 8 x 8 images: a ceil-mode MaxPool gives
    0 x 0, the next pooling divides by zero, SIGFPE: the server process was gone)."""
    sizes = static_sizes(model, shapes)
    if not sizes:
        return
    def judge() -> str:   # why these sizes are too small, "" where they fit
        try:
            return too_small(shapes_at_sizes(model, sizes), {n: dict(a) for n, a in sizes})
        except Exception:  # noqa: BLE001 - where inference fails without the weights, onnxruntime judges
            return ""

    why = model.memo_per("too_small_at", sizes, judge, limit=256)
    if why:
        raise InvalidArgument(field, why)
