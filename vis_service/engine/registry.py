"""Backward rules per op type, grouped into rule sets.

A rule set is a parent set plus overrides: looking up an op type walks from the
named set to its parents, so "deconvnet" only has to say how ReLU-like ops differ
from the exact gradient. Adding a rule is one decorated function:

    @rule("Relu")
    def relu_backward(ctx, node, grad_outputs): ...

A rule receives the gradient tensor name for each node output (None where no
gradient flows) and returns one gradient tensor name per node input (None where
the input needs none, or where its gradient is zero: Sign, Floor, ...); `ctx.needs_grad(node, i)`
tells which inputs matter.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import onnx

if TYPE_CHECKING:
    from .context import RuleContext

RuleFn = Callable[["RuleContext", onnx.NodeProto, list], list]

GRADIENT = "gradient"


@dataclass(frozen=True)
class Rule:
    op_type: str
    fn: RuleFn
    # lowest opset the emitted backward ops need (e.g. ScatterElements reduction=add: 16);
    # models below it are version-converted before differentiation
    min_opset: int = 1


class RuleRegistry:
    def __init__(self) -> None:
        self._parents: dict[str, str | None] = {}
        self._rules: dict[str, dict[str, Rule]] = {}
        self.rule_sets: Mapping[str, str | None] = types.MappingProxyType(self._parents)

    def define_rule_set(self, name: str, parent: str | None = GRADIENT) -> None:
        if parent is not None and parent not in self._parents:
            raise ValueError(f"parent rule set {parent!r} of {name!r} is not defined")
        self._parents[name] = parent
        self._rules.setdefault(name, {})

    def register(self, op_type: str, fn: RuleFn, rule_set: str = GRADIENT, min_opset: int = 1) -> None:
        if rule_set not in self._parents:
            raise ValueError(f"rule set {rule_set!r} is not defined")
        if op_type in self._rules[rule_set]:
            raise ValueError(f"rule for {op_type} already registered in rule set {rule_set!r}")
        self._rules[rule_set][op_type] = Rule(op_type, fn, min_opset)

    def lookup(self, op_type: str, rule_set: str) -> Rule | None:
        current: str | None = rule_set
        while current is not None:
            found = self._rules[current].get(op_type)
            if found is not None:
                return found
            current = self._parents[current]
        return None

    def op_types(self, rule_set: str = GRADIENT) -> list[str]:
        """Op types that have a rule in `rule_set` (own or inherited)."""
        names: set[str] = set()
        current: str | None = rule_set
        while current is not None:
            names.update(self._rules[current])
            current = self._parents[current]
        return sorted(names)


RULES = RuleRegistry()
RULES.define_rule_set(GRADIENT, parent=None)
# Zeiler & Fergus: ReLU-like ops pass relu(upstream), ignoring the forward mask.
RULES.define_rule_set("deconvnet")
# Springenberg et al.: relu(upstream) times the forward mask.
RULES.define_rule_set("guided")
# Lucid's redirected ReLU gradient (activation maximization): where a ReLU passes no gradient for
# an image, the gradient that would raise its inactive units passes.
RULES.define_rule_set("redirected")

# rule set name -> parent name (None for the exact gradient); read-only view
RULE_SETS = RULES.rule_sets


def rule(*op_types: str, rule_set: str = GRADIENT, min_opset: int = 1) -> Callable[[RuleFn], RuleFn]:
    """Register the decorated function as backward rule for `op_types` in `rule_set`."""

    def register(fn: RuleFn) -> RuleFn:
        for op_type in op_types:
            RULES.register(op_type, fn, rule_set, min_opset)
        return fn

    return register
