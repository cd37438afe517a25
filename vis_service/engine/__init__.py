"""Backward-graph engine: vector-Jacobian products as standard ONNX graphs.

Importing the package registers every rule (see `rules/`).
"""
from .backward import GradientGraph, build_gradient_model
from .registry import RULE_SETS, RULES, rule

__all__ = ["GradientGraph", "build_gradient_model", "RULE_SETS", "RULES", "rule"]
