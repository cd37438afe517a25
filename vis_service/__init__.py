"""vis-service: see what an ONNX CNN has learned, over gRPC."""

__version__ = "0.1.0"
