"""What torch's exporters write into CNN graphs that the engine once got wrong or refused.

- Control flow reading the gradient path from the enclosing scope (the TorchScript exporter's
  Squeeze of an axis of unknown size is an If whose branches read the tensor that way, e.g. in
  nn.LocalResponseNorm): the node is on the path; refused (UNIMPLEMENTED, op and node named),
  unless its condition is known when the graph is built, when the branch it takes is
  differentiated. Before, the node was taken for a constant and its gradient silently dropped.
- ceil_mode pools whose last window starts in the padding, with the runtime size recorded in
  value_info (the dynamo exporter): UNIMPLEMENTED, not an onnxruntime error.
- Rules for Sign / Floor / Ceil / Round (zero gradient), Sin, Cos, Atan, CumSum, GatherElements,
  GatherND and TopK (values): adjoint (dot-product) tests on randomized attributes, as in
  test_engine_rules.py, and central differences on small graphs chaining them.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from _engine_helpers import adjoint_check, run_gradient, session
from test_engine_more_rules import _central_differences
from test_engine_rules import LINEAR, SMOOTH, check
from vis_service.engine import RULE_SETS, RULES, build_gradient_model
from vis_service.errors import Unimplemented
from vis_service.graph.loading import prepare_model, tensor_infos
from vis_service.graph.paths import dependents, float_path

NEW_OPS = ["Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Atan", "CumSum", "GatherElements", "GatherND", "TopK",
           "Einsum", "ScatterElements", "ScatterND", "LpPool", "GlobalLpPool", "Col2Im"]
DOUBLE, FLOAT, INT64, BOOL = (onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                              onnx.TensorProto.BOOL)


def _model(nodes, inputs, outputs=("y0",), inits=(), opset=17, elem=DOUBLE, value_info=(), symbolic_batch=False):
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
                              [helper.make_tensor_value_info(o, elem, None) for o in outputs], list(inits),
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return prepare_model(model, symbolic_batch=symbolic_batch)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def test_every_rule_set_finds_the_new_rules():
    for rule_set in RULE_SETS:
        for op in NEW_OPS:
            assert RULES.lookup(op, rule_set) is RULES.lookup(op, "gradient") is not None, (op, rule_set)


# ---- control flow reading the path from the enclosing scope ----------------------------------------------
def _branch(name, nodes, output, shape=None):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, DOUBLE, shape)])


def _if_model(condition_nodes, condition_inits=(), then_op="Sin", x_shape=(2, 3), symbolic_batch=False):
    """x -> r = Relu(x) -> If(cond) { then: Sin(r) or Squeeze(r, [1]) ; else: Mul(r, r) } -> y0 = Exp(.)
    with the branches reading r from the enclosing graph (not an input of the If node)."""
    if then_op == "Squeeze":
        then = _branch("then", [helper.make_node("Squeeze", ["r", "squeeze_axes"], ["t"])], "t")
        other = _branch("else", [helper.make_node("Identity", ["r"], ["e"])], "e")
        condition_inits = list(condition_inits) + [_const("squeeze_axes", np.array([1], np.int64))]
    else:
        then = _branch("then", [helper.make_node(then_op, ["r"], ["t"])], "t")
        other = _branch("else", [helper.make_node("Mul", ["r", "r"], ["e"])], "e")
    nodes = ([helper.make_node("Relu", ["x"], ["r"], name="relu")] + list(condition_nodes)
             + [helper.make_node("If", ["cond"], ["b"], name="my_if", then_branch=then, else_branch=other),
                helper.make_node("Exp", ["b"], ["y0"], name="exp")])
    return _model(nodes, [("x", list(x_shape))], inits=condition_inits, symbolic_batch=symbolic_batch)


def _runtime_condition():
    """cond = ReduceSum(x) > 0: known only when the graph runs."""
    return [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["cond"])], [_const("zero", np.array(0.0))]


def test_path_counts_what_a_subgraph_reads_from_the_enclosing_graph():
    nodes, inits = _runtime_condition()
    model = _if_model(nodes, inits)
    infos = tensor_infos(model)
    path, relevant, _ = float_path(model.graph, ["x"], ["y0"], lambda n: n in infos and infos[n].elem_type == DOUBLE)
    assert [n.op_type for n in path] == ["Relu", "If", "Exp"]
    assert {"r", "b"} <= relevant
    assert {"r", "b", "y0"} <= dependents(model.graph, ["r"])


@pytest.mark.parametrize("rule_set", ["gradient", "deconvnet", "guided"])
def test_if_reading_the_path_with_a_runtime_condition_is_unimplemented(rule_set):
    """Before: the If counted as a constant, the gradient through it was silently dropped (here
    the only one: the build then said x does not influence y0)."""
    nodes, inits = _runtime_condition()
    model = _if_model(nodes, inits)
    with pytest.raises(Unimplemented, match=r"no backward rule for op If \(node 'my_if'\).*control flow"):
        build_gradient_model(model, ["y0"], ["x"], rule_set=rule_set)


def test_if_beside_a_direct_path_is_not_dropped_silently():
    """y0 = x + If(...){reads x}: the direct term alone used to be taken for the whole gradient."""
    then = _branch("then", [helper.make_node("Sin", ["x"], ["t"])], "t")
    other = _branch("else", [helper.make_node("Cos", ["x"], ["e"])], "e")
    nodes, inits = _runtime_condition()
    model = _model(nodes + [helper.make_node("If", ["cond"], ["b"], name="side_if", then_branch=then, else_branch=other),
                            helper.make_node("Add", ["x", "b"], ["y0"])], [("x", [2, 3])], inits=inits)
    with pytest.raises(Unimplemented, match=r"If \(node 'side_if'\)"):
        build_gradient_model(model, ["y0"], ["x"])


def test_loop_body_reading_the_path_is_unimplemented():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "x"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", INT64, []), helper.make_tensor_value_info("cond_in", BOOL, []),
                 helper.make_tensor_value_info("acc_in", DOUBLE, [2, 3])],
        [helper.make_tensor_value_info("cond_out", BOOL, []), helper.make_tensor_value_info("acc_out", DOUBLE, [2, 3])])
    model = _model([helper.make_node("Loop", ["trips", "keep_going", "start"], ["y0"], name="my_loop", body=body)],
                   [("x", [2, 3])], inits=[_const("trips", np.array(2, np.int64)), _const("keep_going", np.array(True)),
                                           _const("start", np.zeros((2, 3)))])
    with pytest.raises(Unimplemented, match=r"no backward rule for op Loop \(node 'my_loop'\)"):
        build_gradient_model(model, ["y0"], ["x"])


def _expected_if_gradient(x, g, then_taken, then_op="Sin"):
    r = np.maximum(x, 0)
    if then_taken:
        inner, slope = (np.sin(r), np.cos(r)) if then_op == "Sin" else (r, np.ones_like(r))
    else:
        inner, slope = r * r, 2 * r
    return g * np.exp(inner) * slope * (x > 0)


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("how", ["initializer", "Constant", "from weights"])
def test_if_with_a_condition_known_at_build_time_takes_its_branch(value, how):
    if how == "initializer":
        nodes, inits = [], [_const("cond", np.array(value))]
    elif how == "Constant":
        nodes, inits = [helper.make_node("Constant", [], ["cond"], value=_const("c", np.array(value)))], []
    else:  # computed from a weight: onnxruntime folds it, so the branch is fixed too
        nodes = [helper.make_node("ReduceSum", ["w"], ["w_total"], keepdims=0),
                 helper.make_node("Greater", ["w_total", "zero"], ["cond"])]
        inits = [_const("w", np.full(3, 1.0 if value else -1.0)), _const("zero", np.array(0.0))]
    model = _if_model(nodes, inits)
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    graph = build_gradient_model(model, ["y0"], ["x"])
    assert not any(n.op_type == "If" for n in graph.model.graph.node)
    got = run_gradient(graph, {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, _expected_if_gradient(x, g, value), rtol=1e-12)
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1e-6).relative_error < 1e-6


@pytest.mark.parametrize("rank", [0, 2])
def test_if_on_the_rank_of_a_batch_tensor_takes_its_branch(rank):
    """The TorchScript exporter writes If(Size(Shape(index)) == 0) around scatter_add / scatter_reduce:
    Size(Shape(x)) is x's rank, known while the batch size is not (it was UNIMPLEMENTED control flow
    on the gradient path for every model exported with a dynamic batch)."""
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]), helper.make_node("Size", ["x_shape"], ["x_rank"]),
             helper.make_node("Equal", ["x_rank", "rank"], ["cond"])]
    model = _if_model(nodes, [_const("rank", np.array(rank, np.int64))], x_shape=("N", 3))
    graph = build_gradient_model(model, ["y0"], ["x"])
    assert not any(n.op_type == "If" for n in graph.model.graph.node)
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    got = run_gradient(graph, {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, _expected_if_gradient(x, g, rank == 2), rtol=1e-12)


def test_taken_branch_brings_its_own_initializers():
    then = helper.make_graph([helper.make_node("Mul", ["r", "K"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", DOUBLE, None)], [_const("K", np.array([1.0, -2.0, 3.0]))])
    other = _branch("else", [], "r")   # passes the outer tensor straight through
    model = _model([helper.make_node("Relu", ["x"], ["r"]),
                    helper.make_node("If", ["cond"], ["y0"], then_branch=then, else_branch=other)],
                   [("x", [2, 3])], inits=[_const("cond", np.array(True))])
    x = np.random.default_rng(14).standard_normal((2, 3))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": np.ones((2, 3))})["x"]
    np.testing.assert_array_equal(got, np.array([1.0, -2.0, 3.0]) * (x > 0))


def test_else_branch_passing_the_outer_tensor_through():
    then = _branch("then", [helper.make_node("Sin", ["r"], ["t"])], "t")
    model = _model([helper.make_node("Relu", ["x"], ["r"]),
                    helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=_branch("else", [], "r")),
                    helper.make_node("Neg", ["b"], ["y0"])], [("x", [2, 3])], inits=[_const("cond", np.array(False))])
    x = np.random.default_rng(15).standard_normal((2, 3))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": np.ones((2, 3))})["x"]
    np.testing.assert_array_equal(got, -1.0 * (x > 0))


@pytest.mark.parametrize("channels", [1, 3])
def test_torchscript_squeeze_of_an_axis_of_unknown_size(channels):
    """If(Shape(r)[1] == 1) { Squeeze(r, [1]) } else { Identity(r) }, as the TorchScript exporter writes
    r.squeeze(1): the size is fixed by the model (the batch is not), so the branch is known."""
    nodes = [helper.make_node("Shape", ["r"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["size"], axis=0),
             helper.make_node("Equal", ["size", "one"], ["cond_1d"]),
             helper.make_node("Squeeze", ["cond_1d"], ["cond"])]
    model = _if_model(nodes, [_const("one", np.array([1], np.int64))], then_op="Squeeze",
                      x_shape=(1, channels, 4), symbolic_batch=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    graph = build_gradient_model(model, ["y0"], ["x"])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, channels, 4))
    out_shape = (3, 4) if channels == 1 else (3, channels, 4)
    g = rng.standard_normal(out_shape)
    got = run_gradient(graph, {"x": x}, {"y0": g})["x"]
    r = np.maximum(x, 0)
    np.testing.assert_allclose(got, g.reshape(x.shape) * np.exp(r) * (x > 0), rtol=1e-12)


def test_if_whose_condition_reads_the_batch_size_is_unimplemented():
    nodes = [helper.make_node("Shape", ["r"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["size"], axis=0),
             helper.make_node("Equal", ["size", "one"], ["cond_1d"]),
             helper.make_node("Squeeze", ["cond_1d"], ["cond"])]
    model = _if_model(nodes, [_const("zero", np.array([0], np.int64)), _const("one", np.array([1], np.int64))],
                      x_shape=(1, 3), symbolic_batch=True)
    with pytest.raises(Unimplemented, match="If"):
        build_gradient_model(model, ["y0"], ["x"])


def test_if_nested_in_the_taken_branch_is_taken_too():
    inner = helper.make_node("If", ["inner_cond"], ["t"], name="inner_if",
                             then_branch=_branch("inner_then", [helper.make_node("Sin", ["r"], ["it"])], "it"),
                             else_branch=_branch("inner_else", [helper.make_node("Cos", ["r"], ["ie"])], "ie"))
    outer_then = helper.make_graph([inner], "outer_then", [], [helper.make_tensor_value_info("t", DOUBLE, None)])
    outer_else = _branch("outer_else", [helper.make_node("Mul", ["r", "r"], ["e"])], "e")
    model = _model([helper.make_node("Relu", ["x"], ["r"]),
                    helper.make_node("If", ["cond"], ["b"], name="outer_if", then_branch=outer_then, else_branch=outer_else),
                    helper.make_node("Exp", ["b"], ["y0"])], [("x", [2, 3])],
                   inits=[_const("cond", np.array(True)), _const("inner_cond", np.array(False))])
    x = np.random.default_rng(5).standard_normal((2, 3))
    g = np.ones((2, 3))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    r = np.maximum(x, 0)
    np.testing.assert_allclose(got, -np.exp(np.cos(r)) * np.sin(r) * (x > 0), rtol=1e-12)


# ---- ceil_mode pools with the runtime size in value_info (dynamo) ---------------------------------------------
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("before", ["Relu", "Neg"])
def test_ceil_mode_pool_with_the_runtime_size_recorded_is_unimplemented(op, before):
    """5x5, kernel 3, stride 3, pads 1, ceil_mode: onnxruntime (and torch) give 2x2, ONNX's formula
    3x3. The dynamo exporter records 2x2; the backward's own pools are re-inferred as 3x3 by
    onnxruntime, so the graph failed inside it (a Mul broadcast, a ScatterElements size, a load-time
    shape error). Now: refused before anything is built."""
    pool = helper.make_node(op, ["a"], ["p"], name="pool", kernel_shape=[3, 3], strides=[3, 3], pads=[1, 1, 1, 1],
                            ceil_mode=1)
    model = _model([helper.make_node(before, ["x"], ["a"]), pool, helper.make_node("ReduceSum", ["p", "axes"], ["y0"],
                                                                                    keepdims=0)],
                   [("x", [2, 2, 5, 5])], inits=[_const("axes", np.array([2, 3], np.int64))], elem=FLOAT,
                   value_info=[helper.make_tensor_value_info("p", FLOAT, [2, 2, 2, 2])])
    assert tensor_infos(model)["p"].shape == (2, 2, 2, 2)  # the recorded size survives preparation
    with pytest.raises(Unimplemented, match=r"onnxruntime computes a \[2, 2\] output where ONNX shape inference "
                                            r"says \[3, 3\] \(ceil_mode"):
        build_gradient_model(model, ["y0"], ["x"])


# ---- zero-gradient steps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sign", "Floor", "Ceil", "Round"])
def test_steps_pass_no_gradient(op):
    """Away from the steps the op is locally constant: differences and gradient are both zero."""
    model = _model([helper.make_node(op, ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y0"])], [("x", [2, 5])])
    x = np.array([[-2.3, -0.7, 0.2, 1.3, 2.6], [-1.2, 0.4, 0.6, 3.3, -3.6]])
    g = np.random.default_rng(6).standard_normal((2, 5))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    forward = {"Sign": np.sign, "Floor": np.floor, "Ceil": np.ceil, "Round": np.round}[op]
    np.testing.assert_allclose(got, g * forward(x), rtol=1e-12)   # d(s * x)/dx with ds/dx = 0
    np.testing.assert_allclose(got, _central_differences(model, x, g, 1e-6), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("summed", [False, True])
def test_wrt_reached_through_steps_only_gets_zeros(summed):
    model = _model([helper.make_node("Floor", ["x"], ["f"]), helper.make_node("Relu", ["f"], ["y0"])],
                   [("x", ["N", 3])], symbolic_batch=True)
    graph = build_gradient_model(model, ["y0"], ["x"], batch_summed=["x"] if summed else ())
    x = np.random.default_rng(7).standard_normal((4, 3))
    got = run_gradient(graph, {"x": x}, {"y0": np.ones((4, 3))})["x"]
    np.testing.assert_array_equal(got, np.zeros((1, 3) if summed else (4, 3)))


def test_lp_pool_as_dynamo_writes_it():
    """nn.LPPool2d(2, 2) under dynamo: Sign(avg) * Relu(Abs(avg)) ** (1/2) * kernel size of the pooled x**2."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("AveragePool", ["sq"], ["avg"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sign", ["avg"], ["sign"]), helper.make_node("Abs", ["avg"], ["abs"]),
             helper.make_node("Relu", ["abs"], ["relu"]), helper.make_node("Mul", ["sign", "relu"], ["signed"]),
             helper.make_node("Mul", ["signed", "four"], ["summed"]), helper.make_node("Pow", ["summed", "half"], ["y0"])]
    f32 = np.float32
    model = _model(nodes, [("x", [2, 3, 4, 4])], elem=FLOAT,  # AveragePool has no float64 kernel
                   inits=[_const("two", f32(2)), _const("four", f32(4)), _const("half", f32(0.5))])
    rng = np.random.default_rng(8)
    x, g = rng.standard_normal((2, 3, 4, 4)).astype(f32), rng.standard_normal((2, 3, 2, 2)).astype(f32)
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, _central_differences(model, x, g, 1e-2), rtol=3e-3, atol=3e-4)


# ---- smooth unary ops ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sin", "Cos", "Atan"])
@pytest.mark.parametrize("opset", [9, 17])
def test_trigonometric(op, opset):
    check(op, {"x": (2, 3, 4)}, opset=opset, kind=SMOOTH)


# ---- CumSum ----------------------------------------------------------------------------------------------------
attr_rng = np.random.default_rng(2025)
CUMSUM_CASES = [(int(attr_rng.integers(-3, 3)), int(attr_rng.integers(0, 2)), int(attr_rng.integers(0, 2)),
                 [np.int64, np.int32][int(attr_rng.integers(0, 2))]) for _ in range(6)]
CUMSUM_CASES += [(1, 0, 0, np.int64), (1, 1, 0, np.int64), (1, 0, 1, np.int64), (-1, 1, 1, np.int32)]


@pytest.mark.parametrize("axis,exclusive,reverse,axis_type", CUMSUM_CASES)
def test_cumsum(axis, exclusive, reverse, axis_type):
    check("CumSum", {"x": (2, 3, 4)}, {"axis": np.array(axis, axis_type)}, kind=LINEAR, exclusive=exclusive,
          reverse=reverse)


def test_cumsum_axis_computed_at_run_time():
    """The backward CumSum takes the forward's axis tensor, whatever computes it."""
    model = _model([helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Size", ["shape"], ["rank"]),
                    helper.make_node("Sub", ["rank", "one"], ["last"]),
                    helper.make_node("CumSum", ["x", "last"], ["y0"], reverse=1)],
                   [("x", [2, 5])], inits=[_const("one", np.array(1, np.int64))])
    x = np.random.default_rng(9).standard_normal((2, 5))
    g = np.random.default_rng(10).standard_normal((2, 5))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, np.cumsum(g, axis=1), rtol=1e-12)


# ---- GatherElements ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_gather_elements_randomized(axis):
    """Random indices with repeats and negative forms; indices smaller than x off the axis."""
    shape = (3, 4, 5)
    r = np.random.default_rng(200 + axis)
    index_shape = [int(r.integers(1, d + 1)) for d in shape]
    index_shape[axis] = int(r.integers(1, 7))
    dim = shape[axis]
    indices = r.integers(-dim, dim, size=index_shape).astype([np.int64, np.int32][axis % 2])
    check("GatherElements", {"x": shape}, {"i": indices}, kind=LINEAR, axis=axis)


def test_gather_elements_accumulates_duplicates_exactly():
    x = np.zeros((2, 3))
    model = _model([helper.make_node("GatherElements", ["x", "i"], ["y0"], axis=1)], [("x", [2, 3])],
                   inits=[_const("i", np.array([[2, 2, -1, 0], [1, 0, 1, 1]], np.int64))])
    g = np.arange(1.0, 9.0).reshape(2, 4)
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_array_equal(got, [[4, 0, 1 + 2 + 3], [6, 5 + 7 + 8, 0]])


@pytest.mark.parametrize("opset", [11, 13])
def test_gather_elements_in_older_models_is_converted_to_opset_16(opset):
    check("GatherElements", {"x": (3, 4)}, {"i": np.array([[1, 1, 0], [0, 3, -1]], np.int64)}, opset=opset,
          kind=LINEAR, axis=1)


# ---- GatherND ---------------------------------------------------------------------------------------------------
def _gather_nd_case(seed):
    """Random data shape, batch_dims, tuple length and index grid; indices with repeats and negatives."""
    r = np.random.default_rng(seed)
    rank = int(r.integers(2, 5))
    shape = tuple(int(d) for d in r.integers(2, 4, size=rank))
    batch_dims = int(r.integers(0, min(2, rank - 1) + 1))
    k = int(r.integers(1, rank - batch_dims + 1))
    grid = tuple(int(d) for d in r.integers(1, 4, size=int(r.integers(0, 3))))
    indices = np.stack([r.integers(-shape[batch_dims + j], shape[batch_dims + j], size=shape[:batch_dims] + grid)
                        for j in range(k)], axis=-1).astype(np.int64)
    return shape, indices, batch_dims


@pytest.mark.parametrize("seed", range(8))
def test_gather_nd_randomized(seed):
    shape, indices, batch_dims = _gather_nd_case(300 + seed)
    check("GatherND", {"x": shape}, {"i": indices}, kind=LINEAR, batch_dims=batch_dims)


@pytest.mark.parametrize("batch_dims", [0, 1, 2])
def test_gather_nd_indices_computed_at_run_time(batch_dims):
    shape = (2, 3, 4, 3)
    r = np.random.default_rng(400 + batch_dims)
    indices = np.stack([r.integers(-shape[batch_dims + j], shape[batch_dims + j], size=shape[:batch_dims] + (5,))
                        for j in range(2)], axis=-1).astype(np.int64)
    indices[..., 1, :] = indices[..., 0, :]   # a duplicate in every batch position
    graph = helper.make_graph([helper.make_node("GatherND", ["x", "i"], ["y0"], batch_dims=batch_dims)], "gnd",
                              [helper.make_tensor_value_info("x", DOUBLE, list(shape)),
                               helper.make_tensor_value_info("i", INT64, list(indices.shape))],
                              [helper.make_tensor_value_info("y0", DOUBLE, None)])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                          symbolic_batch=False)
    feeds = {"x": r.standard_normal(shape), "i": indices}
    assert adjoint_check(model, feeds, ["y0"], ["x"], eps=1.0).relative_error < 1e-12


def test_gather_nd_with_batch_dims_on_a_dynamic_batch():
    graph = helper.make_graph([helper.make_node("GatherND", ["x", "i"], ["y0"], batch_dims=1)], "gnd",
                              [helper.make_tensor_value_info("x", DOUBLE, ["N", 4, 3]),
                               helper.make_tensor_value_info("i", INT64, ["N", 5, 1])],
                              [helper.make_tensor_value_info("y0", DOUBLE, None)])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    for batch in (1, 3):
        r = np.random.default_rng(batch)
        feeds = {"x": r.standard_normal((batch, 4, 3)), "i": r.integers(-4, 4, size=(batch, 5, 1)).astype(np.int64)}
        assert adjoint_check(model, feeds, ["y0"], ["x"], eps=1.0).relative_error < 1e-12


def test_gather_nd_accumulates_duplicates_exactly():
    model = _model([helper.make_node("GatherND", ["x", "i"], ["y0"])], [("x", [2, 3])],
                   inits=[_const("i", np.array([[1, 2], [-1, -1], [0, 0], [1, 2]], np.int64))])
    g = np.array([1.0, 2.0, 3.0, 4.0])
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": np.zeros((2, 3))}, {"y0": g})["x"]
    np.testing.assert_array_equal(got, [[3, 0, 0], [0, 0, 1 + 2 + 4]])


def test_adaptive_average_pool_as_dynamo_writes_it():
    """F.adaptive_avg_pool2d(7x7 -> 3x3) under dynamo: Transpose, GatherND of the overlapping windows
    (constant [3, 3, 3, 3, 2] indices), Transpose, ReduceMean; against the same pooling in numpy."""
    starts = [int(np.floor(i * 7 / 3)) for i in range(3)]
    ends = [int(np.ceil((i + 1) * 7 / 3)) for i in range(3)]
    index = np.zeros((3, 3, 3, 3, 2), np.int64)
    for oi in range(3):
        for oj in range(3):
            for a in range(3):
                for b in range(3):
                    index[oi, oj, a, b] = [min(starts[oi] + a, ends[oi] - 1), min(starts[oj] + b, ends[oj] - 1)]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 3, 0, 1]),
             helper.make_node("GatherND", ["t", "i"], ["gathered"]),
             helper.make_node("Transpose", ["gathered"], ["back"], perm=[4, 5, 0, 1, 2, 3]),
             helper.make_node("ReduceMean", ["back"], ["y0"], axes=[4, 5], keepdims=0)]
    model = _model(nodes, [("x", [2, 4, 7, 7])], inits=[_const("i", index)], opset=17)
    rng = np.random.default_rng(11)
    x, g = rng.standard_normal((2, 4, 7, 7)), rng.standard_normal((2, 4, 3, 3))
    y = session(model).run(None, {"x": x})[0]
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    expected = np.zeros_like(x)
    for oi in range(3):
        for oj in range(3):
            for a in range(3):
                for b in range(3):
                    expected[:, :, index[oi, oj, a, b, 0], index[oi, oj, a, b, 1]] += g[:, :, oi, oj] / 9
    assert y.shape == (2, 4, 3, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# ---- TopK (values) ---------------------------------------------------------------------------------------------
TOPK_CASES = [(int(attr_rng.integers(-3, 3)), int(attr_rng.integers(1, 4)), int(attr_rng.integers(0, 2)),
               int(attr_rng.integers(0, 2))) for _ in range(6)]


@pytest.mark.parametrize("axis,k,largest,sorted_", TOPK_CASES)
def test_top_k_values(axis, k, largest, sorted_):
    """Distinct, well-separated values: no selection changes under the step."""
    check("TopK", {"x": (3, 4, 5)}, {"k": np.array([k], np.int64)}, kind=LINEAR, values="separated", n_outputs=2,
          objectives=["y0"], axis=axis, largest=largest, sorted=sorted_)


def test_top_k_opset_9_attribute_form_is_converted():
    check("TopK", {"x": (3, 5)}, opset=9, kind=LINEAR, values="separated", n_outputs=2, objectives=["y0"], k=2)


# ---- central differences on small chains ---------------------------------------------------------------------
def test_chain_gather_nd_sin_cumsum_top_k_central_differences():
    """GatherND (duplicates) -> Sin -> CumSum (reverse, exclusive) -> TopK values -> Atan, float64,
    every element."""
    nodes = [helper.make_node("GatherND", ["x", "i"], ["gathered"], batch_dims=1),
             helper.make_node("Sin", ["gathered"], ["s"]),
             helper.make_node("CumSum", ["s", "axis"], ["c"], reverse=1, exclusive=1),
             helper.make_node("TopK", ["c", "k"], ["top", "where"], axis=1),
             helper.make_node("Atan", ["top"], ["y0"])]
    indices = np.array([[[0, 1], [2, -1], [0, 1], [1, 0]], [[-1, 2], [0, 0], [1, 1], [2, 2]]], np.int64)
    model = _model(nodes, [("x", [2, 3, 3])], inits=[_const("i", indices), _const("axis", np.array(1, np.int64)),
                                                     _const("k", np.array([2], np.int64))], elem=FLOAT)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 3)).astype(np.float32)
    g = rng.standard_normal((2, 2)).astype(np.float32)
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, _central_differences(model, x, g, 1e-2), rtol=3e-3, atol=3e-4)


def test_chain_gather_elements_cos_round_central_differences():
    """GatherElements -> Cos, plus Round(x) * x beside it, summed: float64, every element."""
    nodes = [helper.make_node("GatherElements", ["x", "i"], ["gathered"], axis=0),
             helper.make_node("Cos", ["gathered"], ["c"]),
             helper.make_node("Round", ["x"], ["r"]), helper.make_node("Mul", ["r", "x"], ["rx"]),
             helper.make_node("ReduceSum", ["rx", "axes"], ["rx_sum"], keepdims=1),
             helper.make_node("Add", ["c", "rx_sum"], ["y0"])]
    model = _model(nodes, [("x", [3, 4])], inits=[_const("i", np.array([[2, 0, -1, 1], [2, 2, 0, 0]], np.int64)),
                                                  _const("axes", np.array([0], np.int64))])
    x = np.array([[0.2, -1.3, 2.7, 0.9], [-0.4, 1.1, -2.2, 3.4], [1.6, -0.8, 0.3, -1.9]])
    g = np.random.default_rng(13).standard_normal((2, 4))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, _central_differences(model, x, g, 1e-6), rtol=1e-6, atol=1e-8)


# ---- Einsum -----------------------------------------------------------------------------------------------------
EINSUM_CASES = [
    ("ij,jk->ik", [(2, 3), (3, 4)]),
    ("bhid,bhjd->bhij", [(2, 2, 3, 4), (2, 2, 5, 4)]),      # attention scores (Keras EinsumDense, tf2onnx)
    ("bhij,bhjd->bhid", [(2, 2, 3, 5), (2, 2, 5, 4)]),
    ("ij,jk", [(2, 3), (3, 4)]),                            # implicit output
    ("bij,bjk", [(2, 3, 4), (2, 4, 5)]),                    # implicit: b summed too
    ("ij->", [(3, 4)]),                                     # letters only the operand has
    ("ij->ji", [(3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 2)]),
    ("ijk,k->ij", [(2, 3, 4), (4,)]),
    ("...ij,...jk->...ik", [(1, 3, 2, 3), (2, 3, 3, 4)]),  # broadcast ellipsis: summed back to size 1
    ("...ij,jk->...ik", [(2, 3, 2, 3), (3, 4)]),            # an operand without the ellipsis
    ("i...j,j->i...", [(3, 2, 4), (4,)]),
    ("...i,i->...", [(2, 3, 4), (4,)]),
]


@pytest.mark.parametrize("equation,shapes", EINSUM_CASES, ids=[e for e, _ in EINSUM_CASES])
def test_einsum(equation, shapes):
    inputs = {f"x{i}": s for i, s in enumerate(shapes)}
    opset = 12 if equation == "ij,jk->ik" else 17
    check("Einsum", inputs, kind=LINEAR, opset=opset, equation=equation)
    # the adjoint check's inner products would broadcast a gradient of the wrong shape
    model = _model([helper.make_node("Einsum", list(inputs), ["y0"], equation=equation)], list(inputs.items()),
                   opset=opset)
    rng = np.random.default_rng(17)
    feeds = {name: rng.standard_normal(shape) for name, shape in inputs.items()}
    y = np.einsum(equation, *feeds.values())
    got = run_gradient(build_gradient_model(model, ["y0"], list(inputs)), feeds, {"y0": np.ones_like(y)})
    assert {name: got[name].shape for name in inputs} == inputs


def test_einsum_wrt_one_operand_of_an_attention_chain_central_differences():
    """softmax(q kᵀ) v written with Einsums, float64, every element of q (x)."""
    nodes = [helper.make_node("Einsum", ["x", "k"], ["s"], equation="bid,bjd->bij"),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("Einsum", ["p", "v"], ["y0"], equation="bij,bjd->bid")]
    rng = np.random.default_rng(14)
    k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3))
    model = _model(nodes, [("x", [2, 4, 3])], inits=[_const("k", k), _const("v", v)])
    x = rng.standard_normal((2, 4, 3))
    g = rng.standard_normal((2, 4, 3))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, _central_differences(model, x, g, 1e-6), rtol=1e-6, atol=1e-8)


def test_einsum_diagonal_operand_is_unimplemented_naming_the_node():
    model = _model([helper.make_node("Einsum", ["x"], ["y0"], equation="ii->i", name="diag")], [("x", [3, 3])])
    with pytest.raises(Unimplemented, match="Einsum node 'diag'.*repeated subscript"):
        build_gradient_model(model, ["y0"], ["x"])


def test_einsum_diagonal_of_a_constant_operand_is_fine():
    w = np.random.default_rng(15).standard_normal((3, 3))
    check("Einsum", {"x": (3, 4)}, {"w": w}, kind=LINEAR, input_order=["w", "x"], equation="ii,ij->ij")


# ---- ScatterElements / ScatterND ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "add"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements(axis, reduction):
    """Distinct indices per target for reduction none (ONNX leaves duplicates undefined there), with
    repeats for add; both data and updates on the path."""
    r = np.random.default_rng(500 + axis)
    shape, update_shape = (4, 5), [3, 3]
    dim = shape[axis]
    columns = [r.permutation(dim)[:update_shape[axis]] for _ in range(update_shape[1 - axis % 2])]
    indices = np.stack(columns, axis=1 - axis % 2 if axis % 2 == 0 else 0).astype(np.int64)
    if reduction == "add":
        indices = r.integers(-dim, dim, size=update_shape).astype(np.int64)
    check("ScatterElements", {"data": shape, "updates": tuple(indices.shape)}, {"i": indices}, kind=LINEAR,
          opset=16 if reduction == "add" else 13, input_order=["data", "i", "updates"], axis=axis,
          **({"reduction": "add"} if reduction == "add" else {}))


@pytest.mark.parametrize("case", ["rows", "elements", "negative"])
@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd(case, reduction):
    shape = (4, 3, 2)
    indices = {"rows": np.array([[3], [0]]), "elements": np.array([[1, 2, 0], [3, 0, 1], [0, 0, 0]]),
               "negative": np.array([[-1, 0], [1, -2]])}[case].astype(np.int64)
    if reduction == "add":
        indices = np.concatenate([indices, indices[:1]])     # a duplicate: both updates add
    update_shape = indices.shape[:-1] + shape[indices.shape[-1]:]
    check("ScatterND", {"data": shape, "updates": update_shape}, {"i": indices}, kind=LINEAR,
          opset=16 if reduction == "add" else 13, input_order=["data", "i", "updates"],
          **({"reduction": "add"} if reduction == "add" else {}))


def test_scatter_nd_gradient_values():
    """reduction none: the overwritten places get no gradient from data; the updates get g there."""
    model = _model([helper.make_node("ScatterND", ["x", "i", "u"], ["y0"])], [("x", [3, 2]), ("u", [1, 2])],
                   inits=[_const("i", np.array([[1]], np.int64))])
    g = np.arange(1.0, 7.0).reshape(3, 2)
    graph = build_gradient_model(model, ["y0"], ["x", "u"])
    got = run_gradient(graph, {"x": np.zeros((3, 2)), "u": np.zeros((1, 2))}, {"y0": g})
    np.testing.assert_array_equal(got["x"], [[1, 2], [0, 0], [5, 6]])
    np.testing.assert_array_equal(got["u"], [[3, 4]])


@pytest.mark.parametrize("op", ["ScatterElements", "ScatterND"])
def test_scatter_with_multiplying_reduction_is_unimplemented(op):
    model = _model([helper.make_node(op, ["x", "i", "u"], ["y0"], reduction="mul", name="scatter")],
                   [("x", [3, 2]), ("u", [1, 2])], inits=[_const("i", np.array([[1]], np.int64))], opset=16)
    with pytest.raises(Unimplemented, match=f"{op} node 'scatter'.*reduction 'mul'"):
        build_gradient_model(model, ["y0"], ["x"])


def test_slice_assignment_as_dynamo_writes_it_central_differences():
    """x[:, 1] = tanh(x[:, 0]) as torch's dynamo exporter writes it (ScatterND of a Gather), float64."""
    nodes = [helper.make_node("Gather", ["x", "zero"], ["col"], axis=1),
             helper.make_node("Tanh", ["col"], ["t"]),
             helper.make_node("Unsqueeze", ["t", "one"], ["t1"]),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Transpose", ["t1"], ["tt"], perm=[1, 0]),
             helper.make_node("ScatterND", ["xt", "row", "tt"], ["st"]),
             helper.make_node("Transpose", ["st"], ["y0"], perm=[1, 0])]
    model = _model(nodes, [("x", [4, 3])], inits=[_const("zero", np.array(0, np.int64)),
                                                  _const("one", np.array([1], np.int64)),
                                                  _const("row", np.array([[1]], np.int64))])
    rng = np.random.default_rng(16)
    x, g = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": g})["x"]
    np.testing.assert_allclose(got, _central_differences(model, x, g, 1e-6), rtol=1e-6, atol=1e-8)


# ---- LpPool / GlobalLpPool ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("attrs", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                   dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                   dict(kernel_shape=[3, 2], strides=[1, 2], pads=[0, 1, 1, 0])],
                         ids=["tiling", "overlapping-padded", "asymmetric"])
def test_lp_pool(p, attrs):
    # p = 1 is piecewise linear (|x|): values kept away from the kink at 0
    kind = dict(kind=LINEAR, values="separated") if p == 1 else {}
    check("LpPool", {"x": (2, 3, 6, 7)}, p=p, opset=11, **kind, **attrs)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_global_lp_pool(p):
    kind = dict(kind=LINEAR, values="separated") if p == 1 else {}
    check("GlobalLpPool", {"x": (2, 3, 4, 5)}, p=p, **kind)


def test_lp_pool_of_a_zero_window_passes_zero_not_nan():
    model = _model([helper.make_node("LpPool", ["x"], ["y0"], kernel_shape=[2, 2], strides=[2, 2], p=2)],
                   [("x", [1, 1, 4, 4])], opset=11, elem=FLOAT)
    x = np.ones((1, 1, 4, 4), np.float32)
    x[:, :, :2, :2] = 0.0
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), {"x": x}, {"y0": np.ones((1, 1, 2, 2), np.float32)})["x"]
    assert np.all(np.isfinite(got)) and np.all(got[:, :, :2, :2] == 0)
    np.testing.assert_allclose(got[:, :, 2:, 2:], 0.5)     # d sqrt(sum of four ones) / dx = 1 / 2


# ---- Col2Im (F.fold) ----------------------------------------------------------------------------------------------
def _blocks(size, kernel, stride, pad_begin, pad_end, dilation):
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


@pytest.mark.parametrize("attrs", [dict(), dict(strides=[2, 2]), dict(strides=[1, 2], pads=[1, 0, 1, 1]),
                                   dict(dilations=[2, 1], pads=[1, 1, 1, 1])],
                         ids=["plain", "strided", "padded", "dilated"])
def test_col2im(attrs):
    image, block, channels = [5, 6], [2, 3], 2
    strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    count = int(np.prod([_blocks(image[i], block[i], strides[i], pads[i], pads[i + 2], dilations[i]) for i in range(2)]))
    check("Col2Im", {"x": (2, channels * 6, count)},
          {"image_shape": np.array(image, np.int64), "block_shape": np.array(block, np.int64)},
          kind=LINEAR, opset=18, **attrs)


@pytest.mark.parametrize("op", ["Einsum", "MatMul"])
def test_batched_product_whose_symbolic_batch_is_1_at_run_time(op):
    """x0 [N, 3, 4] times x1 [M, 4, 5] with N = 1 and M = 3 when run: x0's gradient is summed over the
    batch it was broadcast to (it had x1's batch: a wrong shape, the symbols hid the broadcast)."""
    node = (helper.make_node("Einsum", ["x0", "x1"], ["y0"], equation="bij,bjk->bik") if op == "Einsum"
            else helper.make_node("MatMul", ["x0", "x1"], ["y0"]))
    model = _model([node], [("x0", ["N", 3, 4]), ("x1", ["M", 4, 5])])
    rng = np.random.default_rng(18)
    x0, x1, g = rng.standard_normal((1, 3, 4)), rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 3, 5))
    got = run_gradient(build_gradient_model(model, ["y0"], ["x0", "x1"]), {"x0": x0, "x1": x1}, {"y0": g})
    np.testing.assert_allclose(got["x0"], (g @ x1.transpose(0, 2, 1)).sum(axis=0, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(got["x1"], x0.transpose(0, 2, 1) @ g, rtol=1e-12)


def test_a_route_through_a_tensor_without_type_is_unimplemented_not_invalid():
    """ONNX inference cannot size an Einsum whose ellipses broadcast at different ranks: its output has
    no type; the input does influence the objective, so not 'does not influence' (INVALID_ARGUMENT)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Einsum", ["r", "w"], ["e"], equation="...ij,...jk->...ik", name="unsized"),
             helper.make_node("Exp", ["e"], ["y0"])]
    model = _model(nodes, [("x", [2, 3, 2, 3])], inits=[_const("w", np.ones((3, 3, 4)))])
    with pytest.raises(Unimplemented, match="Einsum node 'unsized': shape inference gives its output 'e' no type"):
        build_gradient_model(model, ["y0"], ["x"])


@pytest.mark.parametrize("starts,ends", [([1, 0], [5, 3]), ([-3, 1], [100, -1]), ([-100, -2], [-2, 2 ** 62]),
                                          ([4, 0], [2, 3]), ([0, 2], [2 ** 63 - 1, 3])],
                         ids=["inside", "negative", "clamped", "empty", "to-the-end"])
def test_slice_with_bounds_computed_at_run_time(starts, ends):
    """torch's masked_scatter and boolean-mask assignment (TorchScript exporter) slice with ends computed
    in the graph: the gradient pads back by amounts computed there too (was UNIMPLEMENTED)."""
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"])
    graph = helper.make_graph([node, helper.make_node("Sin", ["s"], ["y0"])], "runtime_slice",
                              [helper.make_tensor_value_info("x", DOUBLE, ["N", 6, 4]),
                               helper.make_tensor_value_info("starts", INT64, [2]),
                               helper.make_tensor_value_info("ends", INT64, [2])],
                              [helper.make_tensor_value_info("y0", DOUBLE, None)],
                              [_const("axes", np.array([1, -1], np.int64))])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    rng = np.random.default_rng(19)
    x = rng.standard_normal((2, 6, 4))
    feeds = {"x": x, "starts": np.array(starts, np.int64), "ends": np.array(ends, np.int64)}
    rows, cols = slice(*np.clip([starts[0], ends[0]], -2 ** 62, 2 ** 62)), slice(*np.clip([starts[1], ends[1]], -2 ** 62, 2 ** 62))
    g = rng.standard_normal(x[:, rows, cols].shape)
    got = run_gradient(build_gradient_model(model, ["y0"], ["x"]), feeds, {"y0": g})["x"]
    expected = np.zeros_like(x)
    expected[:, rows, cols] = g * np.cos(x[:, rows, cols])
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_reshape_to_a_shape_computed_at_run_time_keeps_its_rank_at_opset_13():
    """tf2onnx's Keras LayerNormalization folds the batch: Reshape(x, Concat([1], N * H * W, [C, 1])).
    Opset-13 shape inference gives its output no rank, and every tensor after it none (the whole
    model was UNIMPLEMENTED, 'unknown rank'): the rank is the target's length, its known elements sizes."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"]),
             helper.make_node("Mul", ["n", "positions"], ["rows"]),
             helper.make_node("Concat", ["one", "rows", "channels"], ["folded_shape"], axis=0),
             helper.make_node("Reshape", ["x", "folded_shape"], ["folded"]),
             helper.make_node("Sin", ["folded"], ["s"]),
             helper.make_node("Reshape", ["s", "shape"], ["y0"])]
    model = _model(nodes, [("x", ["N", 4, 3])], opset=13,
                   inits=[_const("zero", np.array([0], np.int64)), _const("positions", np.array([4], np.int64)),
                          _const("one", np.array([1], np.int64)), _const("channels", np.array([3, 1], np.int64))])
    folded = tensor_infos(model)["folded"].shape
    assert len(folded) == 4 and folded[0] == 1 and folded[2:] == (3, 1)
    x = np.random.default_rng(21).standard_normal((2, 4, 3))
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1e-6).relative_error < 1e-8


def test_class_token_expanded_to_the_batch_as_torchscript_writes_it():
    """torch's cls_token.expand(B, -1, -1) (a ViT) under the TorchScript exporter with a free batch:
    Expand(token, Where(Equal(shape, -1), 1, shape)) with shape = [B, -1, -1]. The target was unknown
    to shape inference, so the Concat with the patches had no static size (UNIMPLEMENTED); it is
    [B, 1, C] from the partly known vector."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"]),
             helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
             helper.make_node("Concat", ["batch1", "minus_one", "minus_one"], ["wanted"], axis=0),
             helper.make_node("Reshape", ["wanted", "flat"], ["target"]),
             helper.make_node("Shape", ["target"], ["target_len"]),
             helper.make_node("ConstantOfShape", ["target_len"], ["ones"],
                              value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Mul", ["ones", "minus_one"], ["minus_ones"]),
             helper.make_node("Equal", ["target", "minus_ones"], ["keep"]),
             helper.make_node("Where", ["keep", "ones", "target"], ["expanded_shape"]),
             helper.make_node("Expand", ["token", "expanded_shape"], ["tokens"]),
             helper.make_node("Concat", ["tokens", "x"], ["joined"], axis=1),
             helper.make_node("Tanh", ["joined"], ["y0"])]
    token = np.random.default_rng(22).standard_normal((1, 1, 4))
    model = _model(nodes, [("x", ["N", 3, 4])], inits=[
        _const("zero", np.array(0, np.int64)), _const("axes0", np.array([0], np.int64)),
        _const("minus_one", np.array([-1], np.int64)), _const("flat", np.array([-1], np.int64)), _const("token", token)])
    assert tensor_infos(model)["tokens"].shape == ("N", 1, 4)
    x = np.random.default_rng(23).standard_normal((2, 3, 4))
    assert adjoint_check(model, {"x": x}, ["y0"], ["x"], eps=1e-6).relative_error < 1e-8
