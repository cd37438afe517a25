"""Backward-graph engine: vector-Jacobian products as standard ONNX graphs.

`build_gradient_model(model, objectives, wrt, rule_set, node_rules, forward_outputs)`
returns the forward model extended with cotangent inputs and gradient outputs.

Rules live in `rules/` (one module per op family) and are registered on import:

    from vis_service.engine.registry import rule

    @rule("Softplus")
    def softplus_backward(ctx, node, grad_outputs):
        # d/dx log(1 + e^x) = sigmoid(x)
        return [ctx.make_node("Mul", [grad_outputs[0], ctx.make_node("Sigmoid", [node.input[0]])])]

`@rule("Relu", rule_set="deconvnet")` overrides a rule in one rule set; lookups fall
back to the parent set ("gradient"). `RuleContext` (context.py) offers node emission,
constants, static shapes, `needs_grad`, optional primal outputs and opset-aware helpers.
"""
from .backward import GradientGraph, build_gradient_model
from .registry import RULE_SETS, RULES, rule

__all__ = ["GradientGraph", "build_gradient_model", "RULE_SETS", "RULES", "rule"]
