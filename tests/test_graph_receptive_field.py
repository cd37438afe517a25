"""Receptive fields: brute force on small nets (positive weights, ReLU never dead),
published numbers on real models, and coverage of all 13 models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from _graph_helpers import ALL_MODELS, Net, load

from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model, tensor_infos
from vis_service.graph.receptive_field import ReceptiveField, crop_box, in_input_order, receptive_fields


# ----------------------------------------------------------------------------
# brute force: perturb one input pixel at a time (all channels), see which units change


def empirical_boxes(model: onnx.ModelProto, nhwc: bool = False, signed: bool = False):
    """tensor -> (h, w, 4) array of (top, left, bottom, right) of influencing pixels per unit.

    All weights are positive and biases absent, so an all-zero image gives zeros
    everywhere and a one-hot pixel gives a positive value exactly in the units it
    can reach. `signed`: ops with negative coefficients (cubic resampling, normalization)
    on the way: any non-zero value marks a unit the pixel reaches.
    """
    import onnxruntime as ort

    m = prepare_model(model)
    rfs = receptive_fields(m)
    inp = m.graph.input[0].name
    names = [n for n in rfs if n != inp]
    exposed = expose_tensors(m, names)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(exposed.SerializeToString(), so, providers=["CPUExecutionProvider"])
    shape = tensor_infos(m)[inp].shape
    H, W = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
    C = shape[3] if nhwc else shape[1]
    x = np.zeros((H * W, C, H, W), np.float32)
    b = np.arange(H * W)
    x[b, :, b // W, b % W] = 1.0
    if nhwc:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    outs = dict(zip(names, sess.run(None, {inp: x})))
    boxes = {}
    for n, y in outs.items():
        infl = (np.abs(y) > 1e-6 if signed else y > 0).any(axis=1).reshape(H, W, y.shape[2], y.shape[3])
        rows, cols = infl.any(axis=1), infl.any(axis=0)          # (H, h, w), (W, h, w)
        seen = rows.any(axis=0)  # units that read nothing but padding see no pixel at all
        top = rows.argmax(axis=0)
        bottom = H - rows[::-1].argmax(axis=0)
        left = cols.argmax(axis=0)
        right = W - cols[::-1].argmax(axis=0)
        box = np.stack([top, left, bottom, right], axis=-1)
        box[~seen] = (10**6, 10**6, -1, -1)   # empty: contained in any predicted box, never "full"
        assert seen.any(), n
        boxes[n] = box
    return m, rfs, boxes, (H, W)


def predicted_boxes(rf: ReceptiveField, h: int, w: int, hw):
    return np.array([[crop_box(rf, i, j, hw) for j in range(w)] for i in range(h)])


def check_exact(model, nhwc=False, allow_approx=(), signed=False):
    """Predicted boxes contain the influencing pixels of every unit, and are exact
    wherever the field lies inside the image and touches no padding of any layer.

    The linear field of a unit next to a padded border counts taps that read the
    padding of an intermediate map; such a box is a strict superset of the pixels
    that matter, which is inherent to size/jump/offset fields. So exactness is
    asserted per axis on the units whose influence spans the full field size, and
    the full size must be reached by at least one unit (size and offset exact).
    """
    m, rfs, boxes, hw = empirical_boxes(model, nhwc, signed)
    assert boxes, "nothing to check"
    for n, emp in boxes.items():
        rf = rfs[n]
        pred = predicted_boxes(rf, emp.shape[0], emp.shape[1], hw)
        contains = (pred[..., :2] <= emp[..., :2]).all() and (pred[..., 2:] >= emp[..., 2:]).all()
        assert contains, (n, rf, pred.reshape(-1, 4)[:8], emp.reshape(-1, 4)[:8])
        if rf.approximate:
            assert any(a in n for a in allow_approx), f"{n} unexpectedly approximate: {rf}"
            continue
        if rf.is_global:
            np.testing.assert_array_equal(pred, emp, err_msg=f"{n}: {rf}")
            continue
        size = in_input_order(rf).size   # the boxes are in the input's rows and columns
        for ax in range(2):
            extent = emp[..., 2 + ax] - emp[..., ax]
            full = extent == size[ax]
            assert full.any(), f"{n}: no unit sees a full {size[ax]}-pixel field on axis {ax} (max {extent.max()})"
            np.testing.assert_array_equal(pred[..., ax][full], emp[..., ax][full], err_msg=f"{n}: {rf}")
            np.testing.assert_array_equal(pred[..., 2 + ax][full], emp[..., 2 + ax][full], err_msg=f"{n}: {rf}")
    return rfs


def test_conv_pool_stride_dilation_pads():
    net = Net(c=2, h=45, w=43, seed=1)
    net.conv(cout=3, k=(5, 5), s=(2, 2), pads=(2, 2, 2, 2))
    net.relu()
    net.pool("MaxPool", k=(3, 3), s=(2, 2), pads=(1, 1, 1, 1))
    net.conv(cout=3, k=(3, 3), d=(2, 1), pads=(1, 0, 2, 1))
    net.pool("AveragePool", k=(2, 2), s=(1, 1), ceil=1)
    rfs = check_exact(net.model())
    first = rfs[net.nodes[0].output[0]]
    assert first == ReceptiveField((5, 5), (2, 2), (0, 0))


def test_auto_pad_same_and_rectangular_kernels():
    net = Net(c=1, h=39, w=44, seed=2)
    net.conv(cout=2, k=(4, 4), s=(2, 2), auto_pad="SAME_UPPER")
    net.conv(cout=2, k=(4, 3), s=(3, 2), auto_pad="SAME_LOWER")
    net.conv(cout=2, k=(3, 5), d=(1, 2), pads=(0, 3, 1, 0))
    rfs = check_exact(net.model())
    # SAME_UPPER with k=4, s=2 on 39: out 20, total pad 3, begin 1 -> centre 1.5 - 1
    assert rfs[net.nodes[0].output[0]].offset == (0.5, 0.5)


def test_merges_add_concat_with_shifted_branches():
    net = Net(c=2, h=20, w=20, seed=3)
    x = net.conv(cout=2, k=(3, 3), pads=(1, 1, 1, 1))
    c0, h0, w0 = net.c, net.h, net.w
    a = net.conv(src=x, cout=2, k=(3, 3), pads=(2, 2, 0, 0))
    net.c, net.h, net.w = c0, h0, w0
    b = net.conv(src=x, cout=2, k=(3, 3), pads=(0, 0, 2, 2))
    s = net.node("Add", [a, b])
    net.c, net.h, net.w = c0, h0, w0
    c = net.conv(src=s, cout=2, k=(5, 5), pads=(2, 2, 2, 2))
    net.c, net.h, net.w = c0, h0, w0
    d = net.conv(src=s, cout=3, k=(1, 1))
    cat = net.node("Concat", [c, d], axis=1)
    net.c, net.cur = 5, cat
    net.pool("MaxPool", k=(2, 2), s=(2, 2))
    mx = net.node("Max", [net.cur, net.cur])
    rfs = check_exact(net.model([mx]))
    # union of the two shifted 3x3 windows on a 3x3 field: 3 + 2 + 2 = 7, centred on 0
    assert rfs[s].size == (7, 7) and rfs[s].offset == (0, 0)
    assert rfs[cat].size == (11, 11)


def test_option_a_shortcut_slice_and_pad():
    """resnet20-style shortcut: x[:, :, ::2, ::2] then channel zero-pad, added to a stride-2 conv."""
    net = Net(c=2, h=16, w=16, seed=4)
    x = net.conv(cout=2, k=(3, 3), pads=(1, 1, 1, 1))
    sl = net.node("Slice", [x, net.const(np.array([0, 1], np.int64), "s"), net.const(np.array([99, 99], np.int64), "e"),
                            net.const(np.array([2, 3], np.int64), "a"), net.const(np.array([2, 2], np.int64), "st")])
    pd = net.node("Pad", [sl, net.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "p")])
    conv = net.conv(src=x, cout=4, k=(3, 3), s=(2, 2), pads=(1, 1, 1, 1))
    add = net.node("Add", [conv, pd])
    spad = net.node("Pad", [add, net.const(np.array([0, 0, 2, 1, 0, 0, 1, 0], np.int64), "p")])
    rfs = check_exact(net.model([spad]))
    assert rfs[sl].jump == (2, 2) and rfs[sl].offset == (0, 1) and rfs[sl].size == (3, 3)
    assert rfs[spad].offset == (rfs[add].offset[0] - 4, rfs[add].offset[1] - 2)


def test_nhwc_input_channel_shuffle_and_global_pool():
    net = Net(c=3, h=14, w=12, seed=5, nhwc=True)
    x = net.conv(cout=4, k=(3, 3), s=(2, 2), pads=(1, 1, 1, 1))
    h, w = net.h, net.w
    r = net.node("Reshape", [x, net.const(np.array([1, 2, 2, h, w], np.int64), "shape")])
    t = net.node("Transpose", [r], perm=[0, 2, 1, 3, 4])
    back = net.node("Reshape", [t, net.const(np.array([1, 4, h, w], np.int64), "shape")])
    net.cur = back
    c = net.conv(cout=2, k=(3, 3), pads=(1, 1, 1, 1), group=2)
    g = net.node("GlobalAveragePool", [c])
    rfs = check_exact(net.model([g]), nhwc=True)
    assert rfs[back] == rfs[x]
    assert rfs[g].is_global and crop_box(rfs[g], 0, 0, (14, 12)) == (0, 0, 14, 12)
    assert "image" in rfs and rfs["image"].size == (1, 1)


@pytest.mark.parametrize("seed", range(6))
def test_random_nets(seed):
    rng = np.random.default_rng(100 + seed)
    net = Net(c=2, h=int(rng.integers(36, 48)), w=int(rng.integers(36, 48)), seed=seed)
    for _ in range(int(rng.integers(3, 6))):
        kind = rng.choice(["conv", "conv", "pool", "relu", "res"])
        if kind == "conv":
            k = tuple(int(v) for v in rng.integers(1, 5, size=2))
            s = tuple(int(v) for v in rng.integers(1, 3, size=2))
            d = tuple(int(v) for v in rng.integers(1, 3, size=2))
            pads = tuple(int(min(v, k[i % 2] - 1 + d[i % 2] - 1)) for i, v in enumerate(rng.integers(0, 3, size=4)))
            if min(Net.out_size(net.h, k[0], s[0], d[0], pads[0], pads[2]), Net.out_size(net.w, k[1], s[1], d[1], pads[1], pads[3])) < 3:
                continue
            net.conv(cout=2, k=k, s=s, d=d, pads=pads)
        elif kind == "pool" and min(net.h, net.w) >= 6:
            k = int(rng.integers(2, 4))
            p = int(rng.integers(0, k // 2 + 1))
            net.pool(str(rng.choice(["MaxPool", "AveragePool"])), k=(k, k), s=(2, 2), pads=(p, p, p, p), ceil=int(rng.integers(0, 2)))
        elif kind == "relu":
            net.relu()
        else:  # residual block: conv(k, same pads) + identity
            x = net.cur
            k = int(rng.choice([1, 3, 5]))
            y = net.conv(cout=net.c, k=(k, k), pads=(k // 2,) * 4)
            net.cur = net.node(str(rng.choice(["Add", "Sum", "Mul"])), [x, y])
    if net.cur == "image":
        net.relu()
    check_exact(net.model())


def test_conv_transpose_and_resize_are_flagged_bounds():
    net = Net(c=2, h=9, w=9, seed=6)
    net.conv(cout=2, k=(3, 3), s=(2, 2))
    w = np.random.default_rng(0).uniform(0.1, 1, size=(2, 2, 4, 4)).astype(np.float32)
    ct = net.node("ConvTranspose", [net.cur, net.const(w)], strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[4, 4])
    up = net.node("Resize", [ct, "", net.const(np.array([1, 1, 2, 2], np.float32), "sc")], mode="nearest")
    up2 = net.node("Resize", [ct, "", net.const(np.array([1, 1, 2, 2], np.float32), "sc")], mode="linear")
    rfs = check_exact(net.model([up, up2]), allow_approx=("convtranspose", "resize"))
    assert rfs[ct].approximate and rfs[up].approximate and rfs[ct].jump == (1, 1) and rfs[up].jump == (0.5, 0.5)


def test_a_transpose_that_swaps_rows_and_columns():
    """After Transpose(0, 1, 3, 2) the tensor's axis 2 runs along the input's columns: the fields
    were reported in the tensor's axis order (size_h was the extent in input columns), and crop
    boxes of its units came out transposed (the receptive-field sweep)."""
    net = Net(c=1, h=21, w=13, seed=9)
    net.conv(cout=2, k=(3, 1), s=(2, 1), pads=(1, 0, 1, 0))
    swapped = net.node("Transpose", [net.cur], perm=[0, 1, 3, 2])
    net.cur, net.h, net.w = swapped, net.w, net.h
    after = net.conv(cout=2, k=(5, 1))
    rfs = check_exact(net.model([swapped, after]))
    assert rfs[swapped].transposed and rfs[after].transposed
    assert in_input_order(rfs[swapped]) == ReceptiveField((3, 1), (2, 1), (0, 0))
    assert in_input_order(rfs[after]) == ReceptiveField((3, 5), (2, 1), (0, 2))


def test_an_add_of_global_fields_is_global():
    """Two global tensors whose nominal jumps differ (a pool of the image and of a strided conv's map)
    gave their sum no field."""
    net = Net(c=1, h=15, w=15, seed=10)
    image = net.cur
    a = net.node("GlobalAveragePool", [image])
    net.conv(cout=1, k=(3, 3), s=(2, 2))   # 7 units reading rows 0..14: all of them, jump 14 for the pool
    b = net.node("GlobalAveragePool", [net.cur])
    total = net.node("Add", [a, b])
    rfs = check_exact(net.model([total]))
    assert rfs[a].jump != rfs[b].jump and rfs[total].is_global


def test_a_resize_to_given_sizes_keeps_the_fields_after_it():
    """prepare_model writes Resize's `sizes` as Shape(image) pieces and constants: counted as computed
    from the image (with no field), they left the Resize and everything after it without one."""
    net = Net(c=1, h=17, w=20, seed=11)
    net.conv(cout=2, k=(3, 3), s=(2, 2))
    up = net.node("Resize", [net.cur, "", "", net.const(np.array([1, 2, 19, 14], np.int64), "sizes")], mode="linear")
    net.cur, net.h, net.w = up, 19, 14
    after = net.conv(cout=2, k=(3, 3), pads=(1, 1, 1, 1))
    rfs = check_exact(net.model([up, after]), allow_approx=("resize", "conv"))
    assert rfs[up].approximate and after in rfs


def test_crop_box_convention():
    rf = ReceptiveField((5, 3), (2, 4), (-1, 0.5))
    # rows: centre -1 + 2*3 = 5, +-2 -> 3..7 ; cols: centre 0.5 + 4*1 = 4.5, +-1 -> 3.5..5.5 -> pixels 3..6
    assert crop_box(rf, 3, 1, (100, 100)) == (3, 3, 8, 7)
    # unit 0: rows -3..1 -> 0..1; cols -0.5..1.5, widened to whole pixels -1..2 -> 0..2
    assert crop_box(rf, 0, 0, (100, 100)) == (0, 0, 2, 3)      # clipped at the top/left
    assert crop_box(rf, 60, 30, (100, 100))[2:] == (100, 100)  # clipped at the bottom/right


# ----------------------------------------------------------------------------
# published numbers and the real models


def test_alexnet_numbers():
    m = load("light:bvlc_alexnet")
    rfs = receptive_fields(m)
    convs = [n.output[0] for n in m.graph.node if n.op_type == "Conv"]
    pools = [n.output[0] for n in m.graph.node if n.op_type == "MaxPool"]
    assert rfs[convs[0]].size == (11, 11) and rfs[convs[0]].jump == (4, 4)
    assert rfs[pools[-1]].size == (195, 195) and rfs[pools[-1]].jump == (32, 32)


def _vgg(blocks):
    net = Net(c=1, h=224, w=224)
    for n in blocks:
        for _ in range(n):
            net.conv(cout=1, k=(3, 3), pads=(1, 1, 1, 1))
            net.relu()
        net.pool("MaxPool")
    return prepare_model(net.model()), net.cur


def test_vgg_pool5_numbers():
    m, pool5 = _vgg([2, 2, 3, 3, 3])
    assert receptive_fields(m)[pool5].size == (212, 212)
    m, pool5 = _vgg([2, 2, 4, 4, 4])
    assert receptive_fields(m)[pool5].size == (268, 268)
    real = load("light:vgg19")
    rfs = receptive_fields(real)
    last_pool = [n.output[0] for n in real.graph.node if n.op_type == "MaxPool"][-1]
    assert rfs[last_pool] == ReceptiveField((268, 268), (32, 32), (15.5, 15.5))


def test_resnet50_final_feature_map():
    m = load("light:resnet50")
    rfs = receptive_fields(m)
    # stride on the 3x3 conv (torchvision / caffe2 style): 7 (conv1) + 2*2 (pool) + 3*2*4 + (2*4 + 3*2*8)
    # + (2*8 + 5*2*16) + (2*16 + 2*2*32) = 427
    expected = 7 + 4 + 24 + (8 + 48) + (16 + 160) + (32 + 128)
    assert expected == 427
    last_relu = [n.output[0] for n in m.graph.node if n.op_type == "Relu"][-1]
    assert rfs[last_relu].size == (427, 427) and rfs[last_relu].jump == (32, 32) and not rfs[last_relu].is_global
    pool = [n.output[0] for n in m.graph.node if n.op_type == "AveragePool"][-1]
    assert rfs[pool].is_global   # 7x7 window over the 7x7 map


def test_resnet20_option_a_shortcut():
    m = load("shared:resnet20")
    rfs = receptive_fields(m)
    slices = [n for n in m.graph.node if n.op_type == "Slice"]
    assert rfs[slices[1].output[0]].jump == (2, 2)
    adds = [n.output[0] for n in m.graph.node if n.op_type == "Add"]
    assert all(not rfs[a].approximate for a in adds)
    assert rfs[adds[-1]].jump == (4, 4)


def _input_dependent_4d_float(m):
    infos = tensor_infos(m)
    tainted = {m.graph.input[0].name}
    out = []
    for n in m.graph.node:
        if any(i in tainted for i in n.input):
            for o in n.output:
                tainted.add(o)
                s = infos[o].shape if o in infos else None
                if s is not None and len(s) == 4 and infos[o].elem_type == onnx.TensorProto.FLOAT:
                    out.append(o)
    return out


@pytest.mark.parametrize("model_id", ALL_MODELS)
def test_every_feature_map_of_every_model_has_a_field(model_id):
    m = load(model_id)
    rfs = receptive_fields(m)
    feats = _input_dependent_4d_float(m)
    assert feats
    missing = [t for t in feats if t not in rfs]
    assert not missing, missing[:5]
    assert not any(r.approximate for r in rfs.values())
    for t in feats:
        rf = rfs[t]
        assert rf.size[0] >= 1 and rf.jump[0] > 0
    # fields only grow along the graph: each node's output covers at least its tracked inputs
    for n in m.graph.node:
        if n.output[0] in rfs and n.op_type not in ("Slice",):
            for i in n.input:
                if i in rfs:
                    assert rfs[n.output[0]].size[0] >= rfs[i].size[0], (n.name, n.op_type)


# ----------------------------------------------------------------------------
# cases an audit found unsound (a box missing influencing pixels) or wrong


def test_slice_with_a_negative_step_then_conv():
    """Reversed and subsampled columns: a negative jump; the conv after it grows the extent by |jump|
    (size came out -1, and deconvnet's crops failed on the negative size)."""
    net = Net(c=2, h=18, w=18, seed=7)
    x = net.conv(cout=2, k=(3, 3), pads=(1, 1, 1, 1))
    sl = net.node("Slice", [x, net.const(np.array([-1], np.int64), "s"), net.const(np.array([-(2 ** 62)], np.int64), "e"),
                            net.const(np.array([3], np.int64), "a"), net.const(np.array([-2], np.int64), "st")])
    net.cur, net.w = sl, 9
    out = net.conv(cout=2, k=(3, 3))
    rfs = check_exact(net.model([out]), allow_approx=("slice", "conv"))
    assert rfs[out].size == (5, 7) and rfs[out].jump == (1, -2)


@pytest.mark.parametrize("attrs", [dict(auto_pad="SAME_UPPER"), dict(auto_pad="SAME_LOWER"),
                                   dict(output_shape=[15, 14]), dict(pads=[1, 0, 0, 1], output_padding=[1, 1])])
def test_conv_transpose_paddings(attrs):
    """SAME_UPPER puts an odd total's extra pixel at the end (it was taken as the start: boxes one
    pixel off), and output_shape implies pads (they were read from `pads`)."""
    net = Net(c=2, h=16, w=16, seed=8)
    net.conv(cout=2, k=(3, 3), s=(2, 2), pads=(1, 1, 1, 1))   # a jump of 2: a misplaced crop shifts whole pixels
    w = np.random.default_rng(0).uniform(0.1, 1, size=(2, 2, 3, 3)).astype(np.float32)
    ct = net.node("ConvTranspose", [net.cur, net.const(w)], strides=[2, 2], kernel_shape=[3, 3], **attrs)
    check_exact(net.model([ct]), allow_approx=("convtranspose",))


def test_add_of_branches_with_different_jumps_has_no_field():
    """No size and jump bound both branches' fields at every unit: unknown (boxes: the whole image),
    not a box that drifts away from the strided branch (63 of 64 units missed pixels)."""
    net = Net(c=1, h=16, w=16, seed=9)
    a = net.conv(cout=2, k=(9, 9))
    net.c, net.h, net.w = 1, 16, 16
    b = net.conv(src="image", cout=2, k=(2, 2), s=(2, 2))
    s = net.node("Add", [a, b])
    rfs = receptive_fields(prepare_model(net.model([s])))
    assert a in rfs and b in rfs and s not in rfs


@pytest.mark.parametrize("ctm, nearest, scale, opset", [
    ("align_corners", "floor", 2, 13), ("align_corners", "round_prefer_floor", 3, 13),
    ("half_pixel_symmetric", "floor", 2, 19), ("asymmetric", "ceil", 2, 13), ("half_pixel", "round_prefer_ceil", 3, 13),
    ("pytorch_half_pixel", "floor", 1.5, 13), ("tf_half_pixel_for_nn", "round_prefer_floor", 2, 13),
])
def test_nearest_resize_bounds_every_unit(ctm, nearest, scale, opset):
    net = Net(c=1, h=13, w=13, seed=10)
    x = net.conv(cout=2, k=(3, 3), s=(2, 2))
    up = net.node("Resize", [x, "", net.const(np.array([1, 1, scale, scale], np.float32), "sc")], mode="nearest",
                  coordinate_transformation_mode=ctm, nearest_mode=nearest)
    check_exact(net.model([up], opset=opset), allow_approx=("resize",))


@pytest.mark.parametrize("ctm", ["align_corners", "half_pixel", "asymmetric"])
@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_interpolating_resize_bounds_every_unit(ctm, mode):
    net = Net(c=1, h=11, w=11, seed=11)
    x = net.conv(cout=2, k=(3, 3), s=(2, 2))
    up = net.node("Resize", [x, "", net.const(np.array([1, 1, 2.5, 2.5], np.float32), "sc")], mode=mode,
                  coordinate_transformation_mode=ctm)
    # cubic weights are negative in places: influence is any non-zero response
    rfs = check_exact(net.model([up]), allow_approx=("resize",), signed=mode == "cubic")
    assert rfs[up].approximate


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_reflect_and_edge_pads_have_no_field(mode):
    """Border units read pixels far inside the image: no box placed outside it bounds them."""
    net = Net(c=1, h=10, w=10, seed=12)
    x = net.conv(cout=2, k=(3, 3))
    pd = net.node("Pad", [x, net.const(np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64), "p")], mode=mode)
    net.cur, net.h, net.w = pd, 12, 12
    out = net.conv(cout=2, k=(3, 3))
    rfs = receptive_fields(prepare_model(net.model([out])))
    assert x in rfs and pd not in rfs and out not in rfs


@pytest.mark.parametrize("op", ["InstanceNormalization", "GroupNormalization"])
def test_instance_and_group_normalization_are_global(op):
    net = Net(c=1, h=12, w=12, seed=13)
    x = net.conv(cout=4, k=(3, 3))
    scale = 4 if op == "InstanceNormalization" else 2   # GroupNormalization-18: per group
    attrs = {"num_groups": 2} if op == "GroupNormalization" else {}
    norm = net.node(op, [x, net.const(np.ones(scale, np.float32), "g"), net.const(np.zeros(scale, np.float32), "b")],
                    **attrs)
    net.cur = norm
    out = net.conv(cout=2, k=(3, 3))
    rfs = check_exact(net.model([out], opset=18), signed=True)   # normalized values are negative too
    assert rfs[norm].is_global and rfs[out].is_global


def test_rms_normalization_over_channels_keeps_fields_over_space_drops_them():
    """RMSNormalization (opset 23) normalizes axis..end: over a channels-last tensor's channels it is
    per position, like LayerNormalization (ConvNeXt-style); over the spatial axes it is not local."""
    net = Net(c=2, h=11, w=10, seed=16)
    x = net.conv(cout=4, k=(3, 3))
    nhwc = net.node("Transpose", [x], perm=[0, 2, 3, 1])
    per_position = net.node("RMSNormalization", [nhwc, net.const(np.ones(4, np.float32), "g")], axis=-1)
    back = net.node("Transpose", [per_position], perm=[0, 3, 1, 2])
    over_space = net.node("RMSNormalization", [back, net.const(np.ones((9, 8), np.float32), "g")], axis=2)
    net.cur = over_space
    model = net.model([back, over_space], opset=23)
    model.ir_version = 10
    rfs = receptive_fields(prepare_model(model))
    assert rfs[back] == rfs[x] and over_space not in rfs


def test_a_window_covering_its_input_through_padding_is_global():
    net = Net(c=1, h=7, w=7, seed=14)
    mp = net.pool("MaxPool", k=(9, 9), s=(1, 1), pads=(1, 1, 1, 1))
    rfs = check_exact(net.model([mp]))
    assert rfs[mp].is_global


def test_the_client_sees_which_fields_are_bounds(client):
    net = Net(c=1, h=12, w=12, seed=15)
    x = net.conv(cout=2, k=(3, 3), s=(2, 2))
    up = net.node("Resize", [x, "", net.const(np.array([1, 1, 2, 2], np.float32), "sc")], mode="nearest")
    ins = client.load_model(net.model([up]).SerializeToString()).inspect()
    fields = {t: rf for n in ins.nodes for t, rf in n.receptive_fields.items()}
    assert not fields[x].approximate and fields[up].approximate
    assert f"<={fields[up].size_str()[2:]}" in ins.summary()


def test_the_client_sees_a_swapped_tensors_field_in_input_rows_and_columns(client):
    net = Net(c=1, h=21, w=13, seed=16)
    net.conv(cout=2, k=(3, 1), s=(2, 1), pads=(1, 0, 1, 0))
    swapped = net.node("Transpose", [net.cur], perm=[0, 1, 3, 2])
    ins = client.load_model(net.model([swapped]).SerializeToString()).inspect()
    field = {t: rf for n in ins.nodes for t, rf in n.receptive_fields.items()}[swapped]
    assert (field.size, field.jump, field.offset) == ((3, 1), (2, 1), (0, 0))   # rows first, as the proto says
