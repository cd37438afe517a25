"""Backward rules, one module per op family; importing this package registers them all."""
from . import activations, conv, elementwise, linear, normalization, pooling, quantization, reduce, resize, shape  # noqa: F401
