"""LocalizationService (proto/vis/v1/attribution.proto): CAM family and occlusion sensitivity."""
from __future__ import annotations

import grpc

from .servicers import ServiceState


def register(server: grpc.Server, state: ServiceState) -> list[str]:
    """Add the servicer to `server`; returns the full service names it serves."""
    return []
