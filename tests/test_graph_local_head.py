"""Local heads (graph.local_head): the cut tensor of an occluded image, rebuilt from the head run
on a crop and pasted into the clean image's tensor, then replayed by the tail, gives what the
whole network gives on the occluded image, for every patch position of several geometries."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from _graph_helpers import Net, load

from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model
from vis_service.graph.local_head import (CUT_COST_MACS, axis_spans, head_model, local_cuts, nchw_source,
                                          plan_local_cuts, total_macs)
from vis_service.graph.subgraph import graph_after


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _pad(net, pads, value=0.0):
    """A Pad node of the spatial axes (pads top, left, bottom, right), as tf2onnx writes Keras's
    ZeroPadding2D before a 'valid' Conv."""
    amounts = np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64)
    net.cur = net.node("Pad", [net.cur, net.const(amounts), net.const(np.array(value, np.float32))], mode="constant")
    net.h, net.w = net.h + pads[0] + pads[2], net.w + pads[1] + pads[3]


def _net(h, w, nhwc=False, auto_pad=None, pad_nodes=False):
    """Asymmetric-padded strided conv, BatchNormalization, ceil-mode max-pool, a residual block,
    a channel Concat with a count_include_pad=0 average pool, another strided conv, then a
    global pool and a linear layer. Jumps: 2, 4, 8. `nhwc`: an [N, H, W, C] input transposed
    to NCHW first, as tf2onnx writes it (tensor names then shift by one). `auto_pad`: the
    strided convs pad by auto_pad (SAME_UPPER / SAME_LOWER) instead of explicit pads. `pad_nodes`:
    the strided convs' pads are Pad nodes before them (the second pads with 0.5, not 0)."""
    net = Net(c=3, h=h, w=w, seed=1, nhwc=nhwc)
    if pad_nodes:
        _pad(net, (2, 1, 1, 2))
        net.conv(cout=8, k=(5, 5), s=(2, 2))
    else:
        net.conv(cout=8, k=(5, 5), s=(2, 2), pads=(2, 1, 1, 2), auto_pad=auto_pad)
    c = net.c
    scale, bias = net.const(net.rng.uniform(0.5, 1.5, c).astype(np.float32)), net.const(np.zeros(c, np.float32) + 0.1)
    mean, var = net.const(net.rng.uniform(-0.2, 0.2, c).astype(np.float32)), net.const(np.ones(c, np.float32))
    net.cur = net.node("BatchNormalization", [net.cur, scale, bias, mean, var])
    net.relu()
    net.pool("MaxPool", k=(3, 3), s=(2, 2), pads=(1, 1, 0, 0), ceil=1)
    block_in = net.cur  # maxpool_9; the block: conv_11, relu_12, conv_14, add_15, relu_16
    net.conv(cout=8, k=(3, 3), pads=(1, 1, 1, 1))
    net.relu()
    net.conv(cout=8, k=(3, 3), pads=(1, 1, 1, 1))
    net.cur = net.node("Add", [net.cur, block_in])
    net.relu()
    mixed_in, h_in, w_in = net.cur, net.h, net.w
    a = net.conv(cout=8, k=(1, 1))
    b = net.node("AveragePool", [mixed_in], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                 count_include_pad=0)
    net.cur, net.c, net.h, net.w = net.node("Concat", [a, b], axis=1), 16, h_in, w_in
    if pad_nodes:
        _pad(net, (1, 1, 1, 1), value=0.5)
        net.conv(cout=8, k=(3, 3), s=(2, 2))
    else:
        net.conv(cout=8, k=(3, 3), s=(2, 2), pads=(1, 1, 1, 1), auto_pad=auto_pad)
    net.relu()
    feature = net.cur
    net.cur = net.node("GlobalAveragePool", [net.cur])
    net.cur = net.node("Flatten", [net.cur])
    weights = net.const(net.rng.normal(size=(8, 5)).astype(np.float32))
    net.cur = net.node("Gemm", [net.cur, weights])
    return prepare_model(net.model([net.cur, feature]))


def _occluded(x, corners, patch):
    out = np.repeat(x, len(corners), axis=0)
    for k, (top, left) in enumerate(corners):
        out[k, :, top:top + patch[0], left:left + patch[1]] = 0
    return out


def _through_cut(model, cut, x, grid, corners, patch):
    """Outputs of x with a zero patch at each of `corners` (grid position `grid[k]`), from the
    head run on crops, pasted into the clean image's cut tensor, and the tail."""
    image = model.graph.input[0].name
    outputs = [o.name for o in model.graph.output]
    clean = _session(expose_tensors(model, [cut.tensor])).run([cut.tensor], {image: x})[0]
    spans = [(cut.spans[0][r], cut.spans[1][c]) for r, c in grid]
    crops = np.stack([x[0, :, h.start:h.start + cut.crop[0], w.start:w.start + cut.crop[1]] for h, w in spans])
    for k, ((h, w), (top, left)) in enumerate(zip(spans, corners)):
        t, l = top - h.start, left - w.start
        crops[k, :, max(t, 0):max(t + patch[0], 0), max(l, 0):max(l + patch[1], 0)] = 0
    changed = _session(head_model(model, cut)).run([cut.tensor], {image: crops})[0]
    pasted = np.repeat(clean, len(corners), axis=0)
    for k, (h, w) in enumerate(spans):
        dh, dw = h.start // cut.jump[0], w.start // cut.jump[1]
        pasted[k, :, h.lo:h.hi + 1, w.lo:w.hi + 1] = changed[k, :, h.lo - dh:h.hi - dh + 1, w.lo - dw:w.hi - dw + 1]
    tail = graph_after(model, cut.tensor, outputs)
    assert tail.separates
    return _session(tail.model).run(outputs, {cut.tensor: pasted})


H, W = 96, 84  # W is no multiple of 8, the deepest jump


def _intervals(hw, patch, stride):
    """Rows and columns a patch covers, per grid row / column."""
    return tuple([(t, t + patch[a] - 1) for t in range(0, hw[a] - patch[a] + 1, stride[a])] for a in range(2))


@pytest.mark.parametrize("auto_pad", [None, "SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("patch,stride", [((12, 12), (9, 9)), ((17, 9), (13, 8)), ((5, 13), (11, 10))])
def test_every_cut_replays_the_occluded_image_exactly(patch, stride, auto_pad):
    model = _net(H, W, auto_pad=auto_pad)
    image = model.graph.input[0].name
    outputs = [o.name for o in model.graph.output]
    cuts = local_cuts(model, image, outputs, _intervals((H, W), patch, stride))
    names = {c.tensor for c in cuts}
    # past BatchNormalization, the ceil-mode pool, the residual block and the Concat with its
    # average pool; not inside the block (the skip path bypasses it); not at jump 8 (W % 8)
    assert {"maxpool_9", "relu_16", "concat_20"} <= names
    assert not names & {"conv_11", "relu_12", "conv_14", "conv_22", "relu_23"}
    chain = plan_local_cuts(model, image, outputs, patch, stride, min_saving=0.0, cut_cost=0)
    assert chain and chain[0] in cuts
    # a net this small never pays for a cut's overhead (numpy crops and pastes per image)
    assert plan_local_cuts(model, image, outputs, patch, stride) == []
    _check_every_cut_replays(model, cuts, patch, stride)


def _check_every_cut_replays(model, cuts, patch, stride):
    """Each cut, with crops on its jump grid smaller than the image, gives the whole network's
    outputs of every occluded image."""
    image = model.graph.input[0].name
    outputs = [o.name for o in model.graph.output]
    x = np.random.default_rng(0).normal(size=(1, 3, H, W)).astype(np.float32)
    grid = [(r, c) for r in range(len(range(0, H - patch[0] + 1, stride[0])))
            for c in range(len(range(0, W - patch[1] + 1, stride[1])))]
    corners = [(r * stride[0], c * stride[1]) for r, c in grid]
    want = _session(model).run(outputs, {image: _occluded(x, corners, patch)})
    for cut in cuts:
        assert all(c % j == 0 for c, j in zip(cut.crop, cut.jump)) and cut.crop[0] * cut.crop[1] < H * W
        got = _through_cut(model, cut, x, grid, corners, patch)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=cut.tensor)


@pytest.mark.parametrize("patch,stride", [((12, 12), (9, 9)), ((17, 9), (13, 8))])
def test_cuts_pass_constant_pad_nodes_and_replay_exactly(patch, stride):
    """Keras's ZeroPadding2D (a Pad node before a 'valid' strided Conv, as tf2onnx writes it)
    ended every head: occlusion ran the whole network per patch on Keras's ResNet50, MobileNetV2,
    EfficientNet and DenseNet. A constant Pad pads a crop at the image's edges as it pads the image."""
    model = _net(H, W, pad_nodes=True)
    image = model.graph.input[0].name
    outputs = [o.name for o in model.graph.output]
    cuts = local_cuts(model, image, outputs, _intervals((H, W), patch, stride))
    first_pool = next(n.output[0] for n in model.graph.node if n.op_type == "MaxPool")
    concat = next(n.output[0] for n in model.graph.node if n.op_type == "Concat")
    assert {first_pool, concat} <= {c.tensor for c in cuts}   # past the first Pad
    _check_every_cut_replays(model, cuts, patch, stride)


def test_no_cut_where_the_first_layer_is_not_local():
    net = Net(c=3, h=32, w=32)
    net.cur = net.node("Pad", [net.cur, net.const(np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64))], mode="reflect")
    net.h, net.w = 36, 36  # reflect padding mirrors the image's edges: not a window of fixed pads
    net.conv(cout=8, k=(3, 3), s=(2, 2), pads=(1, 1, 1, 1))
    net.relu()
    net.conv(cout=8, k=(3, 3), pads=(1, 1, 1, 1))
    net.cur = net.node("GlobalAveragePool", [net.cur])
    model = prepare_model(net.model())
    assert plan_local_cuts(model, "image", [net.cur], (8, 8), (4, 4), min_saving=0.0, cut_cost=0) == []


def test_no_cut_when_the_crop_would_be_the_image():
    model = _net(40, 36)
    assert plan_local_cuts(model, "image", [o.name for o in model.graph.output], (30, 30), (5, 5), cut_cost=0) == []


def test_axis_spans_stay_on_the_grid_and_inside_the_image():
    # field 11 wide, jump 4, centre of unit 0 at input 0; 14 units over 56 pixels
    spans, crop = axis_spans(56, 11, 4, 0.0, 14, [(t, t + 7) for t in range(0, 49, 6)])
    assert crop % 4 == 0 and crop < 56
    for t, s in zip(range(0, 49, 6), spans):
        assert s.start % 4 == 0 and 0 <= s.start <= 56 - crop
        # every changed unit's field (clipped to the image) lies in the crop, and only units
        # whose field meets the patch are marked changed
        for u in range(14):
            lo, hi = u * 4 - 5, u * 4 + 5
            meets = lo <= t + 7 and hi >= t
            assert meets == (s.lo <= u <= s.hi)
            if meets:
                assert s.start <= max(lo, 0) and min(hi, 55) < s.start + crop
    assert axis_spans(54, 11, 4, 0.0, 14, [(0, 7)]) is None  # 54 is no multiple of the jump
    # a 1-wide field at jump 2 (a 1x1 conv, stride 2) never sees odd indices: nothing changes
    spans, crop = axis_spans(16, 1, 2, 0.0, 8, [(3, 3), (4, 4)])
    assert (spans[0].lo > spans[0].hi) and (spans[1].lo, spans[1].hi) == (2, 2) and crop == 2
    assert axis_spans(16, 1, 2, 0.0, 8, [(3, 3), (5, 5)]) is None


@pytest.mark.parametrize("constant_shape,local", [([8, 1, 1], True), ([1, 8, 1, 1], True), ([], True),
                                                  ([1], True), ([9], False), ([1, 1, 9], False)])
def test_constants_that_vary_over_space_end_the_head(constant_shape, local):
    net = Net(c=3, h=36, w=36)
    net.conv(cout=8, k=(3, 3), s=(2, 2), pads=(1, 1, 1, 1))  # 18 x 18
    net.pool("MaxPool", k=(2, 2), s=(2, 2))  # 9 x 9
    net.cur = net.node("Add", [net.cur, net.const(np.ones(constant_shape, np.float32))])
    net.relu()
    net.conv(cout=8, k=(3, 3), pads=(1, 1, 1, 1))
    net.cur = net.node("GlobalAveragePool", [net.cur])
    model = prepare_model(net.model())
    names = {c.tensor for c in local_cuts(model, "image", [net.cur], _intervals((36, 36), (8, 8), (4, 4)))}
    assert ("relu_6" in names) == local and "maxpool_3" in names


def test_nhwc_images_start_from_their_transpose_to_nchw_when_it_is_the_only_reader():
    net = Net(c=3, h=16, w=16, nhwc=True)  # image [N, H, W, C] -> Transpose -> NCHW
    view = net.cur
    net.conv(cout=16, k=(3, 3), pads=(1, 1, 1, 1))
    net.cur = net.node("GlobalAveragePool", [net.cur])
    model = prepare_model(net.model())
    assert nchw_source(model, "image", "NHWC") == view
    assert nchw_source(model, "image", "NCHW") == "image"
    around = net.node("Identity", ["image"])  # a second reader: a path around the transpose
    assert nchw_source(prepare_model(net.model([net.cur, around])), "image", "NHWC") is None


def _chain_cost(model, chain, outputs) -> int:
    """The planner's estimate for a chain: heads on their crops, one cut's overhead per cut,
    the network after the last cut in full."""
    rest = graph_after(model, chain[-1].tensor, outputs).model if chain else model
    return sum(c.cost_macs + CUT_COST_MACS for c in chain) + total_macs(rest)


def test_the_searched_chain_costs_less_than_the_greedy_one():
    """ResNet-50 (the onnx wheel's graph), 32x32 patches at stride 16: taking from each source
    the cut that saves most (a long head on a large crop; on the torchvision ResNet-50
    layer2.0 / layer2.3 / layer3.0) is what the planner did before; the search finds a chain of
    shorter heads on crops growing block by block that the estimate puts well below it, and
    below every single cut."""
    model = load("light:resnet50")
    image, outputs = model.graph.input[0].name, [model.graph.output[0].name]
    chain = plan_local_cuts(model, image, outputs, (32, 32), (16, 16))
    assert [c.source for c in chain] == [image] + [c.tensor for c in chain[:-1]]
    greedy, current, source = [], model, image
    changed = _intervals((224, 224), (32, 32), (16, 16))
    while (cuts := local_cuts(current, source, outputs, changed)) and len(greedy) < 3:
        greedy.append(cuts[0])
        current, source = graph_after(model, cuts[0].tensor, outputs).model, cuts[0].tensor
        changed = tuple([(s.lo, s.hi) for s in cuts[0].spans[a]] for a in range(2))
    total = total_macs(model)
    assert _chain_cost(model, chain, outputs) < _chain_cost(model, greedy, outputs) - 0.02 * total
    for cut in local_cuts(model, image, outputs, _intervals((224, 224), (32, 32), (16, 16))):
        assert _chain_cost(model, chain, outputs) <= _chain_cost(model, [cut], outputs)
