"""inspect_model on all 13 models: tensors, parameter counts, names, fields, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from _graph_helpers import ALL_MODELS, load

from vis_service.graph.inspect import inspect_model, node_display_names
from vis_service.graph.loading import prepare_model
from vis_service.graph.receptive_field import receptive_fields

# known totals: weights + biases (+ BN scale/bias/mean/var where the graph has BN)
KNOWN_PARAMS = {
    "shared:mnist-8": 8 * 25 + 8 + 16 * 8 * 25 + 16 + 256 * 10 + 10,
    "light:vgg19": 143_667_240,
    "light:bvlc_alexnet": 60_965_224,
    "light:squeezenet": 1_235_496,
    "shared:squeezenet1.0": 1_235_496,
    "light:resnet50": 25_557_032 + 2 * 26_560,   # torchvision count + BN running mean/var
}


@pytest.mark.parametrize("model_id", ALL_MODELS)
def test_every_model(model_id):
    m = load(model_id)
    t = time.perf_counter()
    s = inspect_model(m)
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, elapsed
    assert len(s.nodes) == len(m.graph.node)
    assert [n.op_type for n in s.nodes] == [n.op_type for n in m.graph.node]
    assert s.inputs[0].datatype == "FP32" and s.inputs[0].shape[0] == "N" and len(s.inputs[0].shape) == 4
    assert s.outputs and s.outputs[0].datatype == "FP32"
    assert s.opset >= 7 and s.ir_version >= 4
    names = [n.name for n in s.nodes]
    assert len(set(names)) == len(names) and all(names)
    assert names == node_display_names(m)
    assert 0 < s.parameter_count <= sum(n.parameter_count for n in s.nodes)  # shared constants count once
    if model_id in KNOWN_PARAMS:
        assert s.parameter_count == KNOWN_PARAMS[model_id]
    rfs = receptive_fields(m)
    for n in s.nodes:
        assert len(n.output_shapes) == len(n.outputs)
        for o, shape in zip(n.outputs, n.output_shapes):
            if o in rfs:
                assert n.receptive_fields[o] == rfs[o]
    convs = [n for n in s.nodes if n.op_type == "Conv"]
    assert all(n.parameter_count > 0 for n in convs)
    assert all(n.receptive_fields for n in convs)
    if model_id.startswith("light:"):
        cos = [n for n in s.nodes if n.op_type == "ConstantOfShape"]
        assert cos and all(n.parameter_count == 0 and not n.receptive_fields for n in cos)
    # constant = depends on no graph input: the light graphs' weight builders, never a Conv
    assert all(n.constant for n in s.nodes if n.op_type in ("ConstantOfShape", "Constant"))
    assert not any(n.constant for n in convs)


def test_parameter_counting_rules():
    """Float constants feeding input-dependent nodes count (shared ones once in the total);
    integer constants and constant-producing nodes do not."""
    w = np.ones((2, 1, 3, 3), np.float32)
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["w2"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Conv", ["img", "w"], ["a"]),
        helper.make_node("Conv", ["img", "w"], ["b"]),               # shares w
        helper.make_node("Conv", ["a", "w2"], ["c"]),
        helper.make_node("Reshape", ["c", "shape"], ["d"]),
        helper.make_node("Add", ["d", "bias"], []),
    ]
    nodes[-1].output.append("e")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("e", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(w, "w"),
                                       numpy_helper.from_array(np.array([4, 2, 3, 3], np.int64), "wshape"),
                                       numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
                                       numpy_helper.from_array(np.zeros(4 * 4 * 4, np.float32), "bias")])
    m = prepare_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    s = inspect_model(m)
    counts = [n.parameter_count for n in s.nodes]
    assert counts == [0, 18, 18, 72, 0, 64]
    assert s.parameter_count == 18 + 72 + 64
    assert [n.name for n in s.nodes] == ["ConstantOfShape_0", "Conv_1", "Conv_2", "Conv_3", "Reshape_4", "Add_5"]
    c = s.nodes[3]
    assert c.output_shapes == (("N", 4, 4, 4),)
    assert c.receptive_fields["c"].size == (5, 5) and c.receptive_fields["c"].jump == (1, 1)
    assert not s.nodes[4].receptive_fields     # 2-D output


def test_layer_suggestions_leave_out_weights_listed_as_graph_inputs():
    """An export that lists its weights among the graph inputs (keep_initializers_as_inputs) offered
    them as close matches for a layer name, each then refused as a constant."""
    import numpy as np
    import onnx
    import pytest
    from onnx import helper, numpy_helper

    from vis_service.errors import NotFound
    from vis_service.graph.names import resolve_tensor

    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "stages.0.conv.weight")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "stages.0.conv.weight"], ["stages.0.conv.out"], name="stages.0.conv")],
                              "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8]),
                                    helper.make_tensor_value_info("stages.0.conv.weight", onnx.TensorProto.FLOAT, [2, 1, 3, 3])],
                              [helper.make_tensor_value_info("stages.0.conv.out", onnx.TensorProto.FLOAT, None)], [w])
    with pytest.raises(NotFound) as e:
        resolve_tensor(helper.make_model(graph), "stages.0")
    assert "stages.0.conv.weight" not in str(e.value) and "stages.0.conv" in str(e.value)
