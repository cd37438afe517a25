"""build_gradient_model's contract: names, errors, rule sets, per-node overrides, outputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from vis_service.engine import RULE_SETS, RULES, build_gradient_model
from _engine_helpers import run_gradient, session
from vis_service.errors import InvalidArgument, NotFound, Unimplemented
from vis_service.graph.loading import prepare_model

FLOAT = onnx.TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, FLOAT, None) for n in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return prepare_model(model)


def relu_chain():
    """y = relu(w * relu(x)) with w = -1 on half the elements: both masks matter."""
    w = numpy_helper.from_array(np.array([1.0, -1.0, 2.0, -2.0], np.float32), "w")
    return make_model([helper.make_node("Relu", ["x"], ["a"], name="relu1"),
                       helper.make_node("Mul", ["a", "w"], ["b"], name="scale"),
                       helper.make_node("Relu", ["b"], ["y"], name="relu2")],
                      [("x", [1, 4])], ["y"], [w])


X = np.array([[1.0, 2.0, -1.0, 3.0]], np.float32)
G = np.array([[1.0, -1.0, 1.0, -1.0]], np.float32)   # upstream cotangent at y


def gradient(model, rule_set="gradient", node_rules=None, objective="y", wrt="x", x=X, g=G):
    graph = build_gradient_model(model, [objective], [wrt], rule_set=rule_set, node_rules=node_rules)
    onnx.checker.check_model(graph.model)
    return run_gradient(graph, {"x": x}, {objective: g})[wrt]


def test_rule_sets_are_registered():
    assert set(RULE_SETS) >= {"gradient", "deconvnet", "guided"}
    assert RULE_SETS["deconvnet"] == "gradient" and RULE_SETS["guided"] == "gradient"
    assert RULES.lookup("Conv", "deconvnet") is RULES.lookup("Conv", "gradient")
    assert RULES.lookup("Relu", "deconvnet") is not RULES.lookup("Relu", "gradient")


def test_exact_gradient_by_hand():
    # a = relu(x) = [1,2,0,3]; b = [1,-2,0,-6]; y = [1,0,0,0]
    # dy/db mask (b>0): [1,0,0,0]; times w: [1,0,0,0]; dy/da mask (a>0): [1,0,0,0]
    np.testing.assert_allclose(gradient(relu_chain()), [[1.0, 0.0, 0.0, 0.0]])


def test_deconvnet_ignores_forward_masks():
    # relu(g) = [1,0,1,0]; times w = [1,0,2,0]; relu = [1,0,2,0] (no mask from x)
    np.testing.assert_allclose(gradient(relu_chain(), "deconvnet"), [[1.0, 0.0, 2.0, 0.0]])


def test_guided_backprop_masks_and_rectifies():
    g = np.array([[1.0, 1.0, 1.0, -1.0]], np.float32)
    x = np.array([[1.0, -2.0, 1.0, 3.0]], np.float32)
    # a = [1,0,1,3]; b = [1,0,2,-6]; y = [1,0,2,0]
    # at relu2: relu(g)*(y>0) = [1,0,1,0]; *w = [1,0,2,0]; at relu1: relu()*(a>0) = [1,0,2,0]
    np.testing.assert_allclose(gradient(relu_chain(), "guided", x=x, g=g), [[1.0, 0.0, 2.0, 0.0]])
    # with a negative upstream where the mask is open, guided zeroes it and plain gradient keeps it
    w_neg = np.array([[-1.0, 0.0, 0.0, 0.0]], np.float32)
    assert gradient(relu_chain(), "guided", x=x, g=w_neg)[0, 0] == 0.0
    assert gradient(relu_chain(), "gradient", x=x, g=w_neg)[0, 0] == -1.0


def test_per_node_rule_override():
    # deconvnet only at relu2: relu(g) = [1,0,1,0]; *w = [1,0,2,0]; exact at relu1 (a>0): [1,0,0,0]
    result = gradient(relu_chain(), node_rules={"relu2": "deconvnet"})
    np.testing.assert_allclose(result, [[1.0, 0.0, 0.0, 0.0]])
    result = gradient(relu_chain(), node_rules={"relu1": "deconvnet"})
    # exact at relu2: g*(b>0) = [1,0,0,0]; *w; relu at relu1: [1,0,0,0]
    np.testing.assert_allclose(result, [[1.0, 0.0, 0.0, 0.0]])


def test_unknown_names_and_rule_sets():
    model = relu_chain()
    with pytest.raises(NotFound, match="'yy'"):
        build_gradient_model(model, ["yy"], ["x"])
    with pytest.raises(NotFound):
        build_gradient_model(model, ["y"], ["nope"])
    with pytest.raises(InvalidArgument, match="rule_set"):
        build_gradient_model(model, ["y"], ["x"], rule_set="lrp-z")
    with pytest.raises(NotFound):
        build_gradient_model(model, ["y"], ["x"], node_rules={"no_such_node": "deconvnet"})


def test_wrt_that_does_not_influence_the_objective():
    with pytest.raises(InvalidArgument, match="'y'.*does not influence|does not influence"):
        build_gradient_model(relu_chain(), ["a"], ["y"])   # y is downstream of a


def test_missing_rule_on_path_names_op_and_node():
    model = make_model([helper.make_node("Relu", ["x"], ["a"], name="relu1"),
                        helper.make_node("Det", ["a"], ["y"], name="my_det")],
                       [("x", [3, 3])], ["y"])
    with pytest.raises(Unimplemented, match=r"no backward rule for op Det \(node 'my_det'\) in rule set 'gradient'"):
        build_gradient_model(model, ["y"], ["x"])


def test_op_without_rule_off_the_path_is_fine():
    # TopK on the side: its output is requested as a forward output but not differentiated
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu1"),
                        helper.make_node("TopK", ["x", "k"], ["top", "idx"], name="topk")],
                       [("x", [1, 4])], ["y", "top"],
                       [numpy_helper.from_array(np.array([2], np.int64), "k")])
    graph = build_gradient_model(model, ["y"], ["x"], forward_outputs=["top"])
    sess = session(graph.model)
    top, grad = sess.run([graph.forward_outputs["top"], graph.gradient_outputs["x"]],
                         {"x": X, graph.cotangent_inputs["y"]: G})
    np.testing.assert_allclose(top, [[3.0, 2.0]])
    np.testing.assert_allclose(grad, [[1.0, -1.0, 0.0, -1.0]])


def test_shape_arithmetic_is_not_differentiated():
    # Reshape target computed from Shape/Gather/Concat of x: only the float path is differentiated
    model = make_model([helper.make_node("Shape", ["x"], ["s"]),
                        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
                        helper.make_node("Concat", ["n", "minus_one"], ["target"], axis=0),
                        helper.make_node("Reshape", ["x", "target"], ["flat"]),
                        helper.make_node("Sigmoid", ["flat"], ["y"])],
                       [("x", ["N", 2, 3])], ["y"],
                       [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                        numpy_helper.from_array(np.array([-1], np.int64), "minus_one")])
    x = np.random.default_rng(0).standard_normal((3, 2, 3)).astype(np.float32)
    graph = build_gradient_model(model, ["y"], ["x"])
    g = run_gradient(graph, {"x": x}, {"y": np.ones((3, 6), np.float32)})["x"]
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(g, s * (1 - s), rtol=1e-5)


def test_outputs_and_accumulation_with_dynamic_batch():
    # y1 = x*x (x used twice), y2 = 3x; two objectives, gradients w.r.t. x and the intermediate h
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    model = make_model([helper.make_node("Identity", ["x"], ["h"]),
                        helper.make_node("Mul", ["h", "h"], ["y1"]),
                        helper.make_node("Mul", ["h", "three"], ["y2"])],
                       [("x", [1, 3])], ["y1", "y2"], [three])
    graph = build_gradient_model(model, ["y1", "y2"], ["x", "h"], forward_outputs=["h", "x"])
    onnx.checker.check_model(graph.model)
    assert set(graph.forward_outputs) == {"y1", "y2", "h", "x"}
    assert {o.name for o in graph.model.graph.output} == set(graph.forward_outputs.values()) | set(graph.gradient_outputs.values())
    cot_input = next(i for i in graph.model.graph.input if i.name == graph.cotangent_inputs["y1"])
    assert cot_input.type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    g1, g2 = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    grads = run_gradient(graph, {"x": x}, {"y1": g1, "y2": g2})
    np.testing.assert_allclose(grads["x"], 2 * x * g1 + 3 * g2)
    np.testing.assert_allclose(grads["h"], 2 * x * g1 + 3 * g2)
    sess = session(graph.model)
    fx = sess.run([graph.forward_outputs["x"]], {"x": x, graph.cotangent_inputs["y1"]: g1,
                                                 graph.cotangent_inputs["y2"]: g2})[0]
    np.testing.assert_allclose(fx, x)


def test_objective_equal_to_wrt():
    graph = build_gradient_model(relu_chain(), ["a"], ["a"])
    grads = run_gradient(graph, {"x": X}, {"a": G})
    np.testing.assert_allclose(grads["a"], G)


def test_weight_gradient_of_conv_is_refused():
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [("x", [1, 1, 5, 5])], ["y"], [w])
    with pytest.raises(Unimplemented, match="weights"):
        build_gradient_model(model, ["y"], ["w"])


def test_input_model_is_not_modified():
    model = make_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
                       [("x", [1, 1, 4, 4])], ["y"])
    before = model.SerializeToString()
    build_gradient_model(model, ["y"], ["x"])
    assert model.SerializeToString() == before


def test_batch_summed_gradient_is_the_sum_of_the_rows():
    """Normalization -> two strided Convs (one with BatchNorm) -> ReLU/pool head: the summed gradient
    equals the sum of the per-row gradients, and the linear layers next to the input run on the
    summed (batch-1) gradient."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from vis_service.engine import build_gradient_model
    from vis_service.errors import InvalidArgument
    from vis_service.graph.loading import prepare_model
    rng = np.random.default_rng(21)
    f = np.float32
    inits = {"mean": rng.standard_normal((1, 3, 1, 1)), "std": rng.uniform(0.5, 2, (1, 3, 1, 1)),
             "w1": rng.standard_normal((8, 3, 3, 3)), "w2": rng.standard_normal((8, 3, 1, 1)),
             "scale": rng.uniform(0.5, 2, 8), "bias": rng.standard_normal(8), "m": rng.standard_normal(8),
             "v": rng.uniform(0.5, 2, 8)}
    nodes = [helper.make_node("Sub", ["x", "mean"], ["centered"]),
             helper.make_node("Div", ["centered", "std"], ["n"]),
             helper.make_node("Conv", ["n", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["n", "w2"], ["c2"], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c2", "scale", "bias", "m", "v"], ["b2"]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Add", ["r1", "b2"], ["s"]),
             helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Tanh", ["n"], ["t"]),   # a per-sample (nonlinear) branch from the same tensor
             helper.make_node("ReduceMean", ["t"], ["tm"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Flatten", ["p"], ["y0"])]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y0", 1, ["N", 32]),
                               helper.make_tensor_value_info("tm", 1, ["N"])],
                              [numpy_helper.from_array(v.astype(f), k) for k, v in inits.items()])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    x = rng.standard_normal((5, 3, 8, 8)).astype(f)
    cot = {"y0": rng.standard_normal((5, 32)).astype(f), "tm": rng.standard_normal(5).astype(f)}
    results = {}
    for summed in (False, True):
        gg = build_gradient_model(model, ["y0", "tm"], ["x"], batch_summed=["x"] if summed else [])
        sess = ort.InferenceSession(gg.model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {"x": x, **{gg.cotangent_inputs[k]: v for k, v in cot.items()}}
        results[summed] = sess.run([gg.gradient_outputs["x"]], feeds)[0]
        # summed where a per-sample backward (ReLU mask, Add of a masked branch, Tanh) meets the
        # linear part: three entries; the plain graph sums nothing over the batch. (The max-pool's
        # scatter reaches both Add inputs, so it is not summed by scattering into one sample.)
        grad_nodes = [n for n in gg.model.graph.node if n.name.startswith("grad/")]
        assert sum(n.op_type == "ReduceSum" for n in grad_nodes) == (3 if summed else 0)
        assert sum(n.op_type == "ScatterElements" for n in grad_nodes) == 1
    assert results[True].shape == (1, 3, 8, 8)
    np.testing.assert_allclose(results[True][0], results[False].sum(axis=0), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgument, match="batch_summed"):
        build_gradient_model(model, ["y0"], ["x"], batch_summed=["n"])


def test_batch_summed_max_pool_scatters_into_one_sample():
    """Overlapping 3x3 / stride 2 windows after a ReLU (ResNet's stem), with ties: the summed
    gradient scatters every row's switches into one sample and equals the sum of the rows."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from vis_service.engine import build_gradient_model
    from vis_service.graph.loading import prepare_model
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", 1, ["N", 2, 9, 9])],
                              [helper.make_tensor_value_info("y", 1, ["N", 100])], [numpy_helper.from_array(w, "w")])
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    x = rng.standard_normal((6, 2, 9, 9)).astype(np.float32)
    x[:, :, 2:7, 2:7] = 0.5   # flat patches: equal maxima in overlapping windows
    x[3] = x[1]               # equal rows
    cot = rng.standard_normal((6, 100)).astype(np.float32)
    out = {}
    for summed in (False, True):
        gg = build_gradient_model(model, ["y"], ["x"], batch_summed=["x"] if summed else [])
        sess = ort.InferenceSession(gg.model.SerializeToString(), providers=["CPUExecutionProvider"])
        out[summed] = sess.run([gg.gradient_outputs["x"]], {"x": x, gg.cotangent_inputs["y"]: cot})[0]
        assert not any(n.op_type == "ReduceSum" for n in gg.model.graph.node)
    assert out[True].shape == (1, 2, 9, 9)
    np.testing.assert_allclose(out[True][0], out[False].sum(axis=0), rtol=1e-5, atol=1e-5)


def test_residual_graphs_ask_for_forward_first_node_order():
    """A backward that masks by a ReLU output which is also a residual Add operand carries the
    forward-first hint; the runtime then creates the session with onnxruntime's priority-based
    order, and the gradient is the same in both orders. A chain carries no hint."""
    import onnxruntime as ort
    from vis_service.graph.hints import EXECUTION_ORDER, FORWARD_FIRST, get_hint
    from vis_service.runtime.sessions import Runtime
    rng = np.random.default_rng(5)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.2, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.2, "w2")
    residual = make_model([helper.make_node("Relu", ["x"], ["r0"]),
                           helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c1"], ["r1"]),
                           helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
                           helper.make_node("Add", ["c2", "r0"], ["s"]),
                           helper.make_node("Relu", ["s"], ["y"])],
                          [("x", ["N", 16, 6, 6])], ["y"], [w1, w2])
    gg = build_gradient_model(residual, ["y"], ["x"])
    assert get_hint(gg.model, EXECUTION_ORDER) == FORWARD_FIRST
    assert get_hint(build_gradient_model(relu_chain(), ["y"], ["x"]).model, EXECUTION_ORDER) is None
    assert get_hint(residual, EXECUTION_ORDER) is None   # the caller's model is left as it was

    runtime = Runtime(provider="cpu")
    hinted = runtime.create_session(gg.model)
    assert hinted.get_session_options().execution_order == ort.ExecutionOrder.PRIORITY_BASED
    plain = runtime.create_session(residual)
    assert plain.get_session_options().execution_order == ort.ExecutionOrder.DEFAULT
    x = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    g = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    feeds = {"x": x, gg.cotangent_inputs["y"]: g}
    fetch = [gg.gradient_outputs["x"]]
    np.testing.assert_allclose(hinted.run(fetch, feeds)[0], session(gg.model).run(fetch, feeds)[0], rtol=1e-5, atol=1e-6)
