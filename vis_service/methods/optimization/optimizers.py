"""Gradient-descent updates (Adam, momentum SGD) and learning-rate schedules, in numpy."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import InvalidArgument
from ...models.inputs import all_finite as finite

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step", "linear")


@dataclass
class OptimizerSettings:
    name: str = "adam"
    lr: float = 0.05
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "constant"
    decay_factor: float = 0.1
    decay_every: int = 0      # "step": 0 = at 60 % and 90 % of the steps

    def validate(self, field: str = "optimizer") -> None:
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(f"{field}.name", f"unknown optimizer {self.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidArgument(f"{field}.lr", f"must be a positive number, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise InvalidArgument(f"{field}.{name}", f"must be in [0, 1), got {v}")
        if self.schedule not in SCHEDULES:
            raise InvalidArgument(f"{field}.schedule", f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if not 0 < self.decay_factor <= 1:
            raise InvalidArgument(f"{field}.decay_factor", f"must be in (0, 1], got {self.decay_factor}")
        if self.decay_every < 0:
            raise InvalidArgument(f"{field}.decay_every", f"must be >= 0, got {self.decay_every}")


def all_finite(*arrays) -> bool:
    """Whether every value is finite (the loops check their loss, gradient and parameters each step)."""
    return all(finite(np.asarray(a)) for a in arrays)


def diverged(step: int, where: str = "", field: str = "optimizer") -> InvalidArgument:
    """The error for a loop whose loss, gradient or parameters became inf / NaN at 0-based `step`
    (`where`: e.g. " of layer 'conv4'"), after at least one update: the steps were too large, and
    results of NaN would answer nothing."""
    return InvalidArgument(f"{field}.lr", f"the optimization diverged at step {step + 1}{where} (non-finite "
                                          "loss, gradient or image); use a smaller lr")


def learning_rate(s: OptimizerSettings, step: int, total: int) -> float:
    """Learning rate of step `step` (0-based) of `total`."""
    if s.schedule == "cosine":
        return s.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))
    if s.schedule == "linear":
        return s.lr * (1.0 - step / max(1, total))
    if s.schedule == "step":
        if s.decay_every > 0:
            k = step // s.decay_every
        else:
            k = int(step >= 0.6 * total) + int(step >= 0.9 * total)
        return s.lr * s.decay_factor ** k
    return s.lr


class Optimizer:
    """Minimizes: `step(params, grad, lr)` returns the updated parameters.

    Momentum SGD's gradients are divided by the RMS of the first step's gradient (per
    batch entry, fixed afterwards): the raw scale of a network's gradient differs by orders
    of magnitude between layers and models, so `lr` means "the first step moves each
    parameter by about lr" -- like Adam's lr -- while the update stays plain momentum SGD.
    """

    def __init__(self, s: OptimizerSettings):
        self.s = s
        self.t = 0
        self.m = None
        self.v = None
        self.grad_scale = None

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
        self.t += 1
        if self.m is None:
            self.m = np.zeros_like(params)
            self.v = np.zeros_like(params) if self.s.name == "adam" else None
        if self.s.name == "sgd":
            if self.grad_scale is None:
                rms = np.sqrt((grad.reshape(len(grad), -1) ** 2).mean(axis=1))
                scale = np.where(rms > 0, 1.0 / np.maximum(rms, 1e-30), 1.0)
                self.grad_scale = scale.reshape((-1,) + (1,) * (grad.ndim - 1))
            self.m = self.s.momentum * self.m + grad * self.grad_scale
            return params - lr * self.m
        # params - lr * mhat / (sqrt(vhat) + eps), mhat = m / (1 - b1^t), vhat = v / (1 - b2^t), with
        # the moments updated in place and the bias corrections as scalars: a step on a 224x224
        # Fourier image took 2.3 ms with a temporary per operation, ~15% of a loop step outside
        # onnxruntime
        b1, b2 = self.s.beta1, self.s.beta2
        m, v = self.m, self.v
        m *= b1
        m += (1 - b1) * grad
        v *= b2
        v += (1 - b2) * np.square(grad)
        denom = np.sqrt(v)
        denom *= 1.0 / math.sqrt(1 - b2 ** self.t)
        denom += 1e-8
        update = np.divide(m, denom, out=denom)
        update *= lr / (1 - b1 ** self.t)
        return params - update
