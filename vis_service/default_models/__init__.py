"""Embedded default model (a small residual CNN trained on scikit-learn's 8x8 digits).

This folder is itself a model repository (``<name>/model.onnx``); the server
serves it when no other repository is given.
"""
from pathlib import Path

DEFAULT_REPOSITORY = Path(__file__).parent
DEFAULT_MODEL_DIR = DEFAULT_REPOSITORY / "digits"

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_REPOSITORY"]
