"""Gradient x input (Shrikumar et al. 2016): first-order contribution of each input value.

attribution = gradient * input (elementwise); map = sum over channels (signed).
"""
from __future__ import annotations

from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from .attribution_common import AttributionInput, attribution_result, reduce_channels, single_gradient
from .progress import MethodResult


def gradient_x_input(runtime: Runtime, model: LoadedModel, ai: AttributionInput) -> MethodResult:
    grad, objective = single_gradient(runtime, model, ai)
    attribution = grad * ai.x
    heat = reduce_channels(attribution, ai.channel_axis, "sum")
    return attribution_result(ai, attribution, heat, {"map": "sum over channels of gradient x input"},
                              objective=objective)
