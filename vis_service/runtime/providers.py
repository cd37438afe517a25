"""Choose the execution provider once, at start: CUDA when it really works, else CPU."""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ProviderChoice:
    name: str                 # provider actually in use
    available: tuple          # what onnxruntime reports as built in
    note: str                 # why the preferred provider is not in use ("" if it is)

    @property
    def providers(self) -> list[str]:
        return [self.name] if self.name == CPU else [self.name, CPU]


def _probe_model() -> bytes:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8  # newer onnx writes IR versions older onnxruntime builds refuse
    return m.SerializeToString()


def select_provider(preferred: str = "auto") -> ProviderChoice:
    """`preferred`: "auto" (CUDA if usable), "cuda" (same, but say loudly if not) or "cpu".

    onnxruntime-gpu lists CUDA as available even on machines without a GPU or
    without the CUDA libraries; only creating a session tells, so we try one.
    """
    available = tuple(ort.get_available_providers())
    if preferred == "cpu":
        return ProviderChoice(CPU, available, "CPU requested")
    if CUDA not in available:
        return ProviderChoice(CPU, available, "this onnxruntime build has no CUDA provider")
    try:  # CUDA/cuDNN from the nvidia-* pip packages, where installed
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            ort.preload_dlls()
        if printed.getvalue().strip():
            # what it could not load is detail: the provider choice below says what that means
            log.debug("onnxruntime.preload_dlls: %s", " ".join(printed.getvalue().split()))
    except Exception:  # noqa: BLE001 - older onnxruntime or nothing to preload
        pass
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    # onnxruntime logs its failed CUDA load as an error on the default logger; we report it ourselves
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(_probe_model(), opts, providers=[CUDA, CPU])
        got = sess.get_providers()
        if got and got[0] == CUDA:
            sess.run(None, {"x": np.ones(2, np.float32)})
            return ProviderChoice(CUDA, available, "")
        note = "onnxruntime has a CUDA provider but could not create a CUDA session (no GPU or CUDA/cuDNN libraries missing); using CPU"
    except Exception as exc:  # noqa: BLE001
        note = f"CUDA session creation failed ({exc}); using CPU"
    finally:
        ort.set_default_logger_severity(2)
    return ProviderChoice(CPU, available, note)
