"""prepare_model on graph patterns that torch's exporters write, built here with onnx.helper.

Batch-1 exports: dynamo's flatten/view (Reshape allowzero=1 to [1, F]), TorchScript's views with
a Constant node target (channel shuffle), a Reshape after a Resize with scales (whose batch dim
shape inference names afresh), dynamo's F.interpolate(size=...) (Resize sizes [1, C, H, W]) and
TorchScript's local response norm (an If on a dim known to be 1) must run at any batch with the
results of batch 1; a batch that cannot be freed keeps the model at batch 1. Constant chains
(TorchScript's pads for F.pad, torch.chunk's split points, repeat_interleave's view) are folded,
so shape inference and the backward rules see static shapes.

Every gradient is checked against central differences of the prepared model (the dot-product
test of _engine_helpers) at batch 1 and 3, and the forward at batch 3 against the unmodified
model run image by image.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

import _graph_helpers  # noqa: F401  (puts the project on sys.path)
from _engine_helpers import adjoint_check, run_gradient, session
from vis_service.engine import build_gradient_model
from vis_service.graph.inspect import node_display_names
from vis_service.graph.loading import prepare_model, tensor_infos

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same numbers whichever tests run before it."""
    global RNG
    RNG = np.random.default_rng(0)


def _w(*shape, scale=0.5):
    return RNG.normal(0, scale, shape).astype(np.float32)


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _const(out, values, dtype=np.int64):
    return helper.make_node("Constant", [], [f"/{out}"], name=f"/{out}", value=numpy_helper.from_array(np.array(values, dtype)))


def _model(nodes, inits, shape, outputs=("y",), opset=17):
    g = helper.make_graph(nodes, "export", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 18 else 9
    return m


def _batch(prepared):
    return tensor_infos(prepared)["input"].shape[0]


def _check_forward(original, prepared, batch, out="y"):
    """The prepared model at `batch` computes what the original computes image by image."""
    x = RNG.standard_normal((batch,) + tuple(tensor_infos(prepared)["input"].shape[1:])).astype(np.float32)
    ref = session(original, optimize=False)
    expected = np.concatenate([ref.run([out], {"input": x[i:i + 1]})[0] for i in range(batch)])
    got = session(prepared, optimize=False).run([out], {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    return x


def _check_gradient(prepared, batches=(1, 3), out="y", eps=3e-3, tol=2e-3):
    """Gradients of <out, w> at each batch: central differences agree, and every row of a batch
    is the gradient of that image alone."""
    graph = build_gradient_model(prepared, [out], ["input"])
    shape = tuple(tensor_infos(prepared)["input"].shape[1:])
    for batch in batches:
        x = RNG.standard_normal((batch,) + shape).astype(np.float32)
        r = adjoint_check(prepared, {"input": x}, [out], ["input"], eps=eps, graph=graph)
        assert r.relative_error < tol, (batch, r)
    n = max(batches)
    if n == 1:
        return
    x = RNG.standard_normal((n,) + shape).astype(np.float32)
    y = session(prepared).run([out], {"input": x})[0]
    w = RNG.standard_normal(y.shape).astype(np.float32)
    rows = run_gradient(graph, {"input": x}, {out: w})["input"]
    for i in range(n):
        one = run_gradient(graph, {"input": x[i:i + 1]}, {out: w[i:i + 1]})["input"]
        np.testing.assert_allclose(rows[i:i + 1], one, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 1. batch-1 exports run at any batch


def test_dynamo_flatten_reshape_allowzero_is_freed():
    """torch.flatten under dynamo: Reshape(allowzero=1) to the constant [1, F]."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="node_conv2d", pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c"], ["t"], name="node_tanh"),
             helper.make_node("Reshape", ["t", "val_7"], ["view"], name="node_view", allowzero=1),
             helper.make_node("Gemm", ["view", "fc"], ["y"], name="node_linear", transB=1)]
    original = _model(nodes, [numpy_helper.from_array(_w(4, 3, 3, 3), "w"), _ints("val_7", [1, 4 * 5 * 5]),
                              numpy_helper.from_array(_w(6, 100, scale=0.1), "fc")], [1, 3, 5, 5], opset=18)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    assert tensor_infos(prepared)["view"].shape == ("N", 100)
    _check_forward(original, prepared, 1)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


def test_torchscript_view_with_constant_node_targets_is_freed():
    """ShuffleNet's channel shuffle under TorchScript: view(n, g, c // g, h, w) with n traced as 1,
    the target a Constant node (not an initializer); the second view is revealed by the first."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/conv/Conv"),
             _const("shape_1", [1, 2, 4, 4, 4]),
             helper.make_node("Reshape", ["c", "/shape_1"], ["r1"], name="/Reshape"),
             helper.make_node("Transpose", ["r1"], ["tr"], name="/Transpose", perm=[0, 2, 1, 3, 4]),
             _const("shape_2", [1, 8, 4, 4]),
             helper.make_node("Reshape", ["tr", "/shape_2"], ["r2"], name="/Reshape_1"),
             helper.make_node("Conv", ["r2", "w2"], ["c2"], name="/conv2/Conv"),
             helper.make_node("Sigmoid", ["c2"], ["s"], name="/Sigmoid"),
             helper.make_node("ReduceMean", ["s"], ["y"], name="/ReduceMean", axes=[2, 3], keepdims=0)]
    original = _model(nodes, [numpy_helper.from_array(_w(8, 3, 3, 3), "w"), numpy_helper.from_array(_w(5, 8, 1, 1), "w2")],
                      [1, 3, 6, 6], opset=12)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    assert tensor_infos(prepared)["r2"].shape == ("N", 8, 4, 4)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


@pytest.mark.parametrize("op", ["Resize", "Tile"])
def test_reshape_after_op_that_renames_the_batch_is_freed(op):
    """After a Resize with scales (or a Tile) ONNX shape inference calls the batch `unk__0`; the
    Reshape [1, F] after it is still the batch's."""
    if op == "Resize":
        mid = [helper.make_node("Resize", ["t", "", "scales"], ["z"], name="/Resize", mode="nearest")]
        inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    else:
        mid = [helper.make_node("Tile", ["t", "reps"], ["z"], name="/Tile")]
        inits = [_ints("reps", [1, 1, 2, 2])]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/Conv"),
             helper.make_node("Tanh", ["c"], ["t"], name="/Tanh"), *mid,
             helper.make_node("Reshape", ["z", "flat"], ["f"], name="/Reshape"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="/Gemm", transB=1)]
    inits += [numpy_helper.from_array(_w(2, 3, 3, 3), "w"), _ints("flat", [1, 2 * 6 * 6]),
              numpy_helper.from_array(_w(4, 72, scale=0.2), "fc")]
    original = _model(nodes, inits, [1, 3, 5, 5], opset=13)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    assert tensor_infos(prepared)["f"].shape == ("N", 72)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


@pytest.mark.parametrize("opset", [18, 13])
def test_resize_sizes_with_batch_one_is_freed(opset):
    """F.interpolate(size=...) under dynamo: Resize with the constant sizes [1, C, H, W] (a UNet's
    decoder). Before: 'resizes the batch axis' even for one image; at batch 3 onnxruntime failed."""
    roi = [""] if opset >= 13 else []
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="node_conv2d", pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c"], ["t"], name="node_tanh"),
             helper.make_node("Resize", ["t", *roi, "", "sizes"], ["up"], name="node_upsample_bilinear2d",
                              mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
             helper.make_node("Conv", ["up", "w2"], ["c2"], name="node_conv2d_1"),
             helper.make_node("ReduceSum", ["c2", "axes"], ["y"], name="node_sum", keepdims=0)]
    original = _model(nodes, [numpy_helper.from_array(_w(3, 2, 3, 3), "w"), _ints("sizes", [1, 3, 9, 11]),
                              numpy_helper.from_array(_w(2, 3, 1, 1), "w2"), _ints("axes", [2, 3])],
                      [1, 2, 5, 6], opset=opset)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    assert tensor_infos(prepared)["up"].shape == ("N", 3, 9, 11)
    _check_forward(original, prepared, 1)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


@pytest.mark.parametrize("dims", [[1, 2, 5, 6], ["batch", 2, 5, 6]])
def test_torchscript_opset11_resize_sizes_from_shape_get_their_shape(dims):
    """TorchScript's F.interpolate(size=(9, 11)) at opset 11: Resize(x, roi, scales=[], sizes=
    Concat(Shape(x)[0:2], [9, 11])). ONNX's Resize-11 inference leaves those sizes unread, so every
    tensor after it had unknown dims and no gradient could be built (a reduction after it needs
    static sizes)."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/c/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="/Relu"),
             helper.make_node("Shape", ["r"], ["shape"], name="/Shape"),
             _const("start", [0]), _const("end", [2]), _const("hw", [9, 11]),
             helper.make_node("Slice", ["shape", "/start", "/end", "/start"], ["nc"], name="/Slice"),
             helper.make_node("Concat", ["nc", "/hw"], ["sizes"], name="/Concat", axis=0),
             _const("roi", [], np.float32), _const("scales", [], np.float32),
             helper.make_node("Resize", ["r", "/roi", "/scales", "sizes"], ["up"], name="/Resize", mode="linear",
                              coordinate_transformation_mode="pytorch_half_pixel"),
             helper.make_node("Conv", ["up", "w2"], ["c2"], name="/c2/Conv"),
             helper.make_node("ReduceMean", ["c2"], ["y"], name="/ReduceMean", axes=[2, 3], keepdims=0)]
    original = _model(nodes, [numpy_helper.from_array(_w(3, 2, 3, 3), "w"), numpy_helper.from_array(_w(2, 3, 1, 1), "w2")],
                      dims, opset=11)
    prepared = prepare_model(original)
    batch = _batch(prepared)
    assert tensor_infos(prepared)["up"].shape == (batch, 3, 9, 11)
    _check_forward(original, prepared, 1)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)





@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_dynamo_as_strided_flat_gather_is_freed(order):
    """ConvNeXt under torch.onnx's dynamo exporter: the pooled channels-last view becomes
    Gather(Reshape(mean, [-1]), arange(C).reshape(1, C, 1, 1)), which reads the first image only
    at a larger batch: the model was kept at batch 1. It is the per-image Reshape(mean, [0, C, 1, 1]);
    indices in another order are no Reshape, and keep the batch at 1."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="node_Conv_0", pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["nhwc"], name="node_Transpose_1", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["nhwc", "lin"], ["mm"], name="node_MatMul_2"),
             helper.make_node("Transpose", ["mm"], ["nchw"], name="node_Transpose_3", perm=[0, 3, 1, 2]),
             helper.make_node("ReduceMean", ["nchw", "axes"], ["mean"], name="node_ReduceMean_4", keepdims=1),
             helper.make_node("Reshape", ["mean", "flat"], ["flat_mean"], name="node_Reshape_5"),
             helper.make_node("Gather", ["flat_mean", "idx"], ["as_strided"], name="node_Gather_6", axis=0),
             helper.make_node("Reshape", ["as_strided", "view"], ["v"], name="node_Reshape_7"),
             helper.make_node("Gemm", ["v", "fc"], ["y"], name="node_Gemm_8", transB=1)]
    inits = [numpy_helper.from_array(_w(4, 2, 3, 3), "w"), numpy_helper.from_array(_w(4, 4), "lin"),
             numpy_helper.from_array(np.array([-1, -2], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.arange(4, dtype=np.int64)[::1 if order == "in order" else -1].reshape(1, 4, 1, 1),
                                     "idx"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "view"), numpy_helper.from_array(_w(3, 4), "fc")]
    original = _model(nodes, inits, [1, 2, 6, 5], opset=18)
    prepared = prepare_model(original)
    if order == "reversed":
        assert _batch(prepared) == 1
        _check_forward(original, prepared, 1)
        _check_gradient(prepared, batches=(1,))
        return
    assert _batch(prepared) == "N"
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)

def test_dynamo_unoptimized_castlike_bias_is_a_constant():
    """torch.onnx's dynamo exporter with optimize=False writes a bias-free Conv's zero bias as
    Expand(CastLike(0.0, input), Shape(weight)[0:1]): CastLike reads the image for its type alone.
    It made the bias depend on the image (no backward rule for CastLike: 7 of 8 torchvision
    classifiers had no gradient) and a scalar computed from the batch kept the batch at 1."""
    nodes = [helper.make_node("Shape", ["w"], ["wshape"], name="node_Shape_0", start=0, end=1),
             _const("zero", 0.0, np.float32),
             helper.make_node("CastLike", ["/zero", "input"], ["zero_like"], name="node_CastLike_4"),
             helper.make_node("Expand", ["zero_like", "wshape"], ["bias"], name="node_Expand_5"),
             helper.make_node("Conv", ["input", "w", "bias"], ["c"], name="node_Conv_6", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="node_Relu_7"),
             helper.make_node("ReduceMean", ["r", "axes"], ["y"], name="node_ReduceMean_8", keepdims=0)]
    inits = [numpy_helper.from_array(_w(3, 2, 3, 3), "w"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    original = _model(nodes, inits, [1, 2, 6, 7], opset=18)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    assert "CastLike" not in {n.op_type for n in prepared.graph.node}
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)

@pytest.mark.parametrize("opset", [18, 21])
def test_dynamo_group_norm_gets_its_shape_and_gradient(opset):
    """torch.onnx's dynamo exporter writes nn.GroupNorm as GroupNormalization from opset 21 (scale
    per channel; per group at 18). ONNX's inference leaves its output shapeless: every tensor after
    it had an unknown rank, and no gradient could be built through it (it had no rule either)."""
    scale = _w(4) if opset >= 21 else _w(2)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/c/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["c", "scale", "bias"], ["gn"], name="/gn/GroupNormalization",
                              num_groups=2, epsilon=1e-5),
             helper.make_node("Sigmoid", ["gn"], ["s"], name="/Sigmoid"),
             helper.make_node("Mul", ["gn", "s"], ["silu"], name="/Mul"),
             helper.make_node("Conv", ["silu", "w2"], ["c2"], name="/c2/Conv", strides=[2, 2]),
             helper.make_node("ReduceMean", ["c2"] + (["axes"] if opset >= 18 else []), ["y"], name="/ReduceMean",
                              keepdims=0)]
    inits = [numpy_helper.from_array(_w(4, 2, 3, 3), "w"), numpy_helper.from_array(scale, "scale"),
             numpy_helper.from_array(_w(*scale.shape, scale=0.1), "bias"), numpy_helper.from_array(_w(3, 4, 3, 3), "w2"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    original = _model(nodes, inits, [1, 2, 9, 10], opset=opset)
    prepared = prepare_model(original)
    batch = _batch(prepared)
    assert tensor_infos(prepared)["gn"].shape == (batch, 4, 9, 10)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)

def test_resize_rule_takes_batch_one_sizes_on_a_symbolic_batch():
    """The Resize rule itself: constant sizes [1, ...] on a symbolic batch (a graph prepare_model
    did not rewrite) keep the batch of the one image the graph runs with."""
    nodes = [helper.make_node("Resize", ["input", "", "", "sizes"], ["y"], mode="linear")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_ints("sizes", [1, 2, 7, 9])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    m = shape_inference.infer_shapes(m, data_prop=True)
    graph = build_gradient_model(m, ["y"], ["input"])
    x = RNG.standard_normal((1, 2, 4, 5)).astype(np.float32)
    assert adjoint_check(m, {"input": x}, ["y"], ["input"], eps=1e-2, graph=graph).relative_error < 1e-3


def test_torchscript_local_response_norm_if_is_inlined():
    """F.local_response_norm under TorchScript: view(1, 1, C, H, -1) (n traced as 1: the -1 takes
    the batch), a 3-D average, squeeze(1) as an If on `size(1) == 1`, view(1, C, H, W). The If's
    condition is known once the first view is freed: the If becomes its Squeeze, same name."""
    c, h = 4, 5
    then = helper.make_graph([_const("then_axes", [1]),
                              helper.make_node("Squeeze", ["pool", "/then_axes"], ["sq"], name="/Squeeze")],
                             "then", [], [helper.make_tensor_value_info("sq", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["pool"], ["same"], name="/Identity")],
                              "else", [], [helper.make_tensor_value_info("same", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["input", "w"], ["x"], name="/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["x", "x"], ["sq_x"], name="/lrn/Mul"),
             _const("view_1", [1, 1, c, h, -1]),
             helper.make_node("Reshape", ["sq_x", "/view_1"], ["v"], name="/lrn/Reshape"),
             _const("pads", [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]),
             helper.make_node("Pad", ["v", "/pads"], ["padded"], name="/lrn/Pad"),
             helper.make_node("AveragePool", ["padded"], ["pool"], name="/lrn/AveragePool", kernel_shape=[3, 1, 1]),
             helper.make_node("Shape", ["pool"], ["shape"], name="/lrn/Shape"),
             _const("one", [1]),
             helper.make_node("Gather", ["shape", "/one"], ["dim1"], name="/lrn/Gather", axis=0),
             helper.make_node("Equal", ["dim1", "/one"], ["is_one"], name="/lrn/Equal"),
             helper.make_node("If", ["is_one"], ["squeezed"], name="/lrn/If", then_branch=then, else_branch=other),
             _const("view_2", [1, c, h, h]),
             helper.make_node("Reshape", ["squeezed", "/view_2"], ["div"], name="/lrn/Reshape_3"),
             helper.make_node("Add", ["div", "one_f"], ["den"], name="/lrn/Add"),
             helper.make_node("Div", ["x", "den"], ["n"], name="/lrn/Div"),
             helper.make_node("ReduceMean", ["n"], ["y"], name="/ReduceMean", axes=[2, 3], keepdims=0)]
    original = _model(nodes, [numpy_helper.from_array(_w(c, 3, 3, 3), "w"), numpy_helper.from_array(np.float32(1), "one_f")],
                      [1, 3, h, h], opset=13)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    inlined = next(n for n in prepared.graph.node if n.name == "/lrn/If")
    assert inlined.op_type == "Squeeze" and list(inlined.output) == ["squeezed"]
    assert len(prepared.graph.node) == len(original.graph.node)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


def _concat_constant_map():
    """CoordConv-like: the image's features joined along channels with a constant [1, 2, H, W] map."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["c", "coords"], ["cat"], name="/Concat", axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["c2"], name="/Conv_1"),
             helper.make_node("ReduceMean", ["c2"], ["y"], name="/ReduceMean", axes=[2, 3], keepdims=0)]
    return nodes, [numpy_helper.from_array(_w(2, 3, 3, 3), "w"), numpy_helper.from_array(_w(1, 2, 4, 4), "coords"),
                   numpy_helper.from_array(_w(3, 4, 1, 1), "w2")]


def _flatten_whole_batch():
    """A max-unpool-like reshape: everything flattened to [-1] (batch included), back to [1, C, H, W]."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "flat"], ["f"], name="/Reshape"),
             helper.make_node("Neg", ["f"], ["g"], name="/Neg"),
             helper.make_node("Reshape", ["g", "back"], ["b"], name="/Reshape_1"),
             helper.make_node("ReduceMean", ["b"], ["y"], name="/ReduceMean", axes=[2, 3], keepdims=0)]
    return nodes, [numpy_helper.from_array(_w(2, 3, 3, 3), "w"), _ints("flat", [-1]), _ints("back", [1, 2, 4, 4])]


def _reduce_over_batch():
    """A statistic over the whole batch (x - x.mean(0)): batch-1 semantics only."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["m"], name="/ReduceMean_0", axes=[0], keepdims=1),
             helper.make_node("Sub", ["c", "m"], ["d"], name="/Sub"),
             helper.make_node("Tanh", ["d"], ["t"], name="/Tanh"),
             helper.make_node("ReduceMean", ["t"], ["y"], name="/ReduceMean", axes=[2, 3], keepdims=0)]
    return nodes, [numpy_helper.from_array(_w(2, 3, 3, 3), "w")]


def _over_batch(op, *extra_inputs, inits=(), **attrs):
    """Conv -> `op` (which mixes the images of a batch without changing its size) -> weighted
    spatial mean (weighted: a normalization's plain mean would be constant)."""
    def build():
        nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/Conv", pads=[1, 1, 1, 1]),
                 helper.make_node(op, ["c", *extra_inputs], ["m"], name=f"/{op}", **attrs),
                 helper.make_node("Mul", ["m", "map"], ["wm"], name="/Mul"),
                 helper.make_node("ReduceMean", ["wm"], ["y"], name="/ReduceMean", axes=[2, 3], keepdims=0)]
        return nodes, [numpy_helper.from_array(_w(2, 3, 3, 3), "w"), numpy_helper.from_array(_w(1, 2, 4, 4), "map"),
                       *[init() for init in inits]]
    build.__name__ = f"{op}_over_batch"
    return build


_MIXING = [_over_batch("Softmax", axis=0), _over_batch("LogSoftmax", axis=-4), _over_batch("Hardmax", axis=0),
           _over_batch("MeanVarianceNormalization"),   # default axes [0, 2, 3]
           _over_batch("LpNormalization", axis=0),
           _over_batch("CumSum", "axis0", inits=[lambda: _ints("axis0", 0)]),
           _over_batch("Slice", "s0", "e0", "a0", "st0",   # x[::-1]: the batch in reverse order
                       inits=[lambda: _ints("s0", [-1]), lambda: _ints("e0", [-(2 ** 63)]), lambda: _ints("a0", [0]),
                              lambda: _ints("st0", [-1])])]


@pytest.mark.parametrize("build", [_concat_constant_map, _flatten_whole_batch, _reduce_over_batch] + _MIXING,
                         ids=lambda b: b.__name__)
def test_batch_that_cannot_be_freed_stays_fixed(build):
    """Where the batch of a batch-1 export cannot be freed, the input keeps its batch of 1 (methods
    then run one row at a time, or refuse) instead of failing inside onnxruntime at batch 3, or
    giving other results than the model at batch 1."""
    nodes, inits = build()
    original = _model(nodes, inits, [1, 3, 4, 4], opset=13)
    prepared = prepare_model(original)
    assert _batch(prepared) == 1
    _check_forward(original, prepared, 1)
    _check_gradient(prepared, batches=(1,))
    # an input without a batch of 1 is left as it came
    dynamic = _model(nodes, inits, ["batch", 3, 4, 4], opset=13)
    assert _batch(prepare_model(dynamic)) == "batch"


@pytest.mark.parametrize("build", [
    _over_batch("Softmax", axis=1), _over_batch("LogSoftmax", axis=-1), _over_batch("MeanVarianceNormalization", axes=[2, 3]),
    _over_batch("LpNormalization", axis=1), _over_batch("CumSum", "axis2", inits=[lambda: _ints("axis2", 2)]),
    _over_batch("Slice", "s0", "e0", "a0", inits=[lambda: _ints("s0", [0, 0]), lambda: _ints("e0", [2 ** 63 - 1, 4]),
                                                  lambda: _ints("a0", [0, 3])])], ids=lambda b: b.__name__)
def test_the_same_ops_per_image_are_freed(build):
    """The ops of the test above along other axes (or a Slice of the whole batch) work image by image."""
    nodes, inits = build()
    original = _model(nodes, inits, [1, 3, 4, 4], opset=13)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


# ---------------------------------------------------------------------------------------------
# 2. constant chains are folded


def _ts_pads(prefix, torch_pads, rank=4):
    """TorchScript's F.pad pads: Concat(pads, zeros) -> [-1, 2] -> reversed rows -> transposed -> flat."""
    return [_const(f"{prefix}c0", [rank]),
            _const(f"{prefix}c1", torch_pads),
            helper.make_node("ConstantOfShape", [f"/{prefix}c0"], [f"{prefix}zeros"], name=f"/{prefix}ConstantOfShape",
                             value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
            helper.make_node("Concat", [f"/{prefix}c1", f"{prefix}zeros"], [f"{prefix}cat"], name=f"/{prefix}Concat", axis=0),
            _const(f"{prefix}c2", [-1, 2]),
            helper.make_node("Reshape", [f"{prefix}cat", f"/{prefix}c2"], [f"{prefix}rows"], name=f"/{prefix}Reshape"),
            _const(f"{prefix}c3", [0]), _const(f"{prefix}c4", [-1]), _const(f"{prefix}c5", [-(2 ** 63) + 1]),
            _const(f"{prefix}c6", [-1]),
            helper.make_node("Slice", [f"{prefix}rows", f"/{prefix}c4", f"/{prefix}c5", f"/{prefix}c3", f"/{prefix}c6"],
                             [f"{prefix}rev"], name=f"/{prefix}Slice"),
            helper.make_node("Transpose", [f"{prefix}rev"], [f"{prefix}tr"], name=f"/{prefix}Transpose", perm=[1, 0]),
            _const(f"{prefix}c7", [-1]),
            helper.make_node("Reshape", [f"{prefix}tr", f"/{prefix}c7"], [f"{prefix}flat"], name=f"/{prefix}Reshape_1"),
            helper.make_node("Cast", [f"{prefix}flat"], [f"{prefix}pads"], name=f"/{prefix}Cast", to=TensorProto.INT64)]


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_torchscript_pad_chain_is_folded(mode):
    """F.pad / ReflectionPad2d / Conv2d(padding_mode='reflect') under TorchScript: the pads are an
    unfolded chain of constants. Before: 'Conv backward needs static sizes' / 'pads computed at
    run time'. The chain becomes Constant nodes in place; nothing else moves."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="/c1/Conv"),
             helper.make_node("Tanh", ["c"], ["t"], name="/Tanh"),
             *_ts_pads("p", [1, 2, 2, 1]),
             helper.make_node("Pad", ["t", "ppads"], ["padded"], name="/Pad", mode=mode),
             helper.make_node("Conv", ["padded", "w2"], ["c2"], name="/c2/Conv"),
             helper.make_node("ReduceSum", ["c2", "axes"], ["y"], name="/ReduceSum", keepdims=0)]
    original = _model(nodes, [numpy_helper.from_array(_w(3, 2, 3, 3), "w"), numpy_helper.from_array(_w(2, 3, 3, 3), "w2"),
                              _ints("axes", [2, 3])], [1, 2, 7, 6], opset=17)
    prepared = prepare_model(original)
    assert tensor_infos(prepared)["padded"].shape == ("N", 3, 8, 7)   # H 5 + 2 + 1, W 4 + 1 + 2
    assert [n.name for n in prepared.graph.node] == [n.name for n in original.graph.node]
    folded = {n.name: n.op_type for n in prepared.graph.node}
    assert all(folded[n.name] == "Constant" for n in original.graph.node if n.name.startswith("/p"))
    assert all(folded[n] == n_op for n, n_op in [("/c1/Conv", "Conv"), ("/Pad", "Pad"), ("/c2/Conv", "Conv")])
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


def test_torchscript_chunk_split_points_are_folded():
    """torch.chunk(x, 2, 1) (ShuffleNetV2's channel split) under TorchScript: Slice bounds from
    Shape -> Gather -> Add -> Div -> Mul. Before: the halves had unknown shapes."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["x"], name="/c1/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["x"], ["shape"], name="/Shape"),
             _const("axis", [1]),
             helper.make_node("Gather", ["shape", "/axis"], ["ch"], name="/Gather", axis=0),
             _const("zero", [0]), _const("one", [1]), _const("two", [2]),
             helper.make_node("Add", ["ch", "/one"], ["ch1"], name="/Add"),
             helper.make_node("Div", ["ch1", "/two"], ["half"], name="/Div"),
             helper.make_node("Mul", ["half", "/one"], ["end0"], name="/Mul"),
             helper.make_node("Slice", ["x", "/zero", "end0", "/axis"], ["a"], name="/Slice"),
             helper.make_node("Mul", ["half", "/two"], ["end1"], name="/Mul_1"),
             helper.make_node("Slice", ["x", "end0", "end1", "/axis"], ["b"], name="/Slice_1"),
             helper.make_node("Sigmoid", ["b"], ["sb"], name="/Sigmoid"),
             helper.make_node("Concat", ["sb", "a"], ["cat"], name="/Concat", axis=1),
             helper.make_node("Conv", ["cat", "w2"], ["c2"], name="/c2/Conv"),
             helper.make_node("ReduceSum", ["c2", "axes"], ["y"], name="/ReduceSum", keepdims=0)]
    original = _model(nodes, [numpy_helper.from_array(_w(6, 3, 3, 3), "w"), numpy_helper.from_array(_w(4, 6, 1, 1), "w2"),
                              _ints("axes", [2, 3])], [1, 3, 5, 5], opset=17)
    prepared = prepare_model(original)
    assert tensor_infos(prepared)["a"].shape == ("N", 3, 5, 5) and tensor_infos(prepared)["cat"].shape == ("N", 6, 5, 5)
    ops = {n.name: n.op_type for n in prepared.graph.node}
    assert ops["/Gather"] == ops["/Div"] == ops["/Mul_1"] == "Constant" and ops["/Shape"] == "Shape"
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


def test_repeat_interleave_view_target_from_shape_is_static():
    """torch.repeat_interleave(x, 2, dim=2) under TorchScript: Unsqueeze -> Tile -> Reshape to
    Concat(Shape[0:2], [-1], Shape[4:5]), the batch among the target's entries."""
    nodes = [helper.make_node("Conv", ["input", "w"], ["x"], name="/c1/Conv", pads=[1, 1, 1, 1]),
             _const("ax3", [3]),
             helper.make_node("Unsqueeze", ["x", "/ax3"], ["u"], name="/Unsqueeze"),
             _const("reps", [1, 1, 1, 2, 1]),
             helper.make_node("Tile", ["u", "/reps"], ["tiled"], name="/Tile"),
             helper.make_node("Shape", ["tiled"], ["shape"], name="/Shape"),
             _const("s0", [0]), _const("e0", [2]), _const("s1", [4]), _const("e1", [5]), _const("m1", [-1]),
             helper.make_node("Slice", ["shape", "/s0", "/e0", "/s0"], ["head"], name="/Slice"),
             helper.make_node("Slice", ["shape", "/s1", "/e1", "/s0"], ["tail"], name="/Slice_1"),
             helper.make_node("Concat", ["head", "/m1", "tail"], ["target"], name="/Concat", axis=0),
             helper.make_node("Reshape", ["tiled", "target"], ["r"], name="/Reshape"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="/c2/Conv", strides=[2, 1]),
             helper.make_node("Tanh", ["c2"], ["t"], name="/Tanh"),
             helper.make_node("ReduceSum", ["t", "axes"], ["y"], name="/ReduceSum", keepdims=0)]
    original = _model(nodes, [numpy_helper.from_array(_w(4, 3, 3, 3), "w"), numpy_helper.from_array(_w(2, 4, 3, 3), "w2"),
                              _ints("axes", [2, 3])], [1, 3, 5, 6], opset=17)
    prepared = prepare_model(original)
    assert _batch(prepared) == "N"
    assert tensor_infos(prepared)["r"].shape == ("N", 4, 10, 6)
    _check_forward(original, prepared, 3)
    _check_gradient(prepared)


def test_folding_keeps_weights_names_and_large_constants():
    """Only integer (shape) results and float parameters of Resize are folded, in place: weights built
    in the graph stay as their nodes (Inspect lists them), unnamed nodes keep their display names,
    and a constant too large to fold is neither folded nor computed."""
    nodes = [helper.make_node("ConstantOfShape", ["wshape"], ["w"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.1])),
             helper.make_node("ConstantOfShape", ["huge"], ["big"], value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
             helper.make_node("Conv", ["input", "w"], ["c"]),
             helper.make_node("Shape", ["big"], ["big_shape"]),
             *[n for n in _ts_pads("q", [0, 1, 1, 0])],
             helper.make_node("Pad", ["c", "qpads"], ["p"]),
             helper.make_node("Concat", ["sc_a", "sc_b"], ["scales"], axis=0),
             helper.make_node("Resize", ["p", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("ReduceSum", ["up", "axes"], ["y"], keepdims=0)]
    for n in nodes:
        if n.op_type != "Constant":
            n.name = ""
    inits = [_ints("wshape", [2, 3, 3, 3]), _ints("huge", [1 << 40]), _ints("axes", [2, 3]),
             numpy_helper.from_array(np.array([1, 1], np.float32), "sc_a"),
             numpy_helper.from_array(np.array([2, 2], np.float32), "sc_b")]
    original = _model(nodes, inits, [1, 3, 6, 6], opset=17)
    prepared = prepare_model(original)
    before, after = node_display_names(original), node_display_names(prepared)
    ops = [n.op_type for n in prepared.graph.node]
    assert len(after) == len(before)
    for k, node in enumerate(original.graph.node):
        if ops[k] == node.op_type:
            assert after[k] == before[k]
    assert ops[0] == ops[1] == "ConstantOfShape"         # a float weight, an integer tensor of 2**40
    assert ops[nodes.index(next(n for n in nodes if n.op_type == "Concat" and n.input[0] == "sc_a"))] == "Constant"
    assert tensor_infos(prepared)["up"].shape == ("N", 2, 10, 10)
