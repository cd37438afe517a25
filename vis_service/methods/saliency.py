"""Saliency maps (Simonyan et al. 2014): how strongly each input value moves the target.

attribution = the raw gradient d target / d input; map = max over channels of |gradient|
(or, `signed`, the signed gradient of the channel where |gradient| is largest).
"""
from __future__ import annotations

from ..models.store import LoadedModel
from ..runtime.sessions import Runtime
from .attribution_common import AttributionInput, attribution_result, reduce_channels, single_gradient
from .progress import MethodResult


def saliency(runtime: Runtime, model: LoadedModel, ai: AttributionInput, signed: bool = False) -> MethodResult:
    grad, objective = single_gradient(runtime, model, ai)
    how = "signed_max_abs" if signed else "max_abs"
    heat = reduce_channels(grad, ai.channel_axis, how)
    text = {"map": "signed gradient of the channel with the largest |gradient|" if signed
            else "max over channels of |gradient|"}
    return attribution_result(ai, grad, heat, text, objective=objective)
