"""Guided backpropagation (Springenberg et al. 2015): the gradient under rule set "guided"
(ReLU passes relu(upstream) where its forward output was positive).

attribution = the guided gradient; map = max over channels of |attribution|.
"""
from __future__ import annotations

from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from .attribution_common import AttributionInput, attribution_result, reduce_channels, single_gradient
from .progress import MethodResult


def guided_backprop(runtime: Runtime, model: LoadedModel, ai: AttributionInput) -> MethodResult:
    grad, objective = single_gradient(runtime, model, ai, rule_set="guided")
    heat = reduce_channels(grad, ai.channel_axis, "max_abs")
    return attribution_result(ai, grad, heat, {"map": "max over channels of |guided gradient|"},
                              objective=objective)
