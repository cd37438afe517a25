"""Progress reporting and cancellation for long methods.

A method calls `progress.update(done, total, ...)` between units of work; that
reports to the API layer (which streams it to the client) and raises `Cancelled`
as soon as the client has gone away, so loops stop within one unit of work.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import Cancelled

ProgressCallback = Callable[[int, int, str, dict], None]


class Progress:
    def __init__(self, callback: ProgressCallback | None = None, cancelled: threading.Event | None = None):
        self._callback = callback
        self.cancelled = cancelled or threading.Event()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled by the client")

    def update(self, done: int, total: int, stage: str = "", **values: float) -> None:
        self.check()
        if self._callback is not None:
            self._callback(int(done), int(total), stage, {k: float(v) for k, v in values.items()})


NO_PROGRESS = Progress()


@dataclass
class MethodResult:
    """What a method returns: named arrays plus scalars, label names and text."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
