"""Attribution methods (saliency family, deconvnet projections, CAM family, occlusion).

Mixed into :class:`vis_client.Client`; uses its channel and stream helpers.
"""
from __future__ import annotations


class AttributionMixin:
    """Client methods for ``AttributionService`` (proto/vis/v1/attribution.proto)."""
