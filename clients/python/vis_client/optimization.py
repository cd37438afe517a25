"""Optimization loops (activation maximization, class models, feature inversion).

Mixed into :class:`vis_client.Client`; uses its channel and stream helpers.
"""
from __future__ import annotations


class OptimizationMixin:
    """Client methods for ``OptimizationService`` (proto/vis/v1/optimization.proto)."""
