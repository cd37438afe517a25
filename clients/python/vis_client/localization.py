"""Localization methods (CAM family, occlusion sensitivity).

Mixed into :class:`vis_client.Client`; uses its channel and stream helpers.
"""
from __future__ import annotations


class LocalizationMixin:
    """Client methods for ``LocalizationService`` (proto/vis/v1/attribution.proto)."""
