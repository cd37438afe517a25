#!/usr/bin/env python3
"""Train the embedded default model (``vis_service/default_models/digits``) with numpy only.

A small residual CNN on scikit-learn's 8x8 ``digits`` (upsampled to 32x32, see
``vis_service/default_models/digits_data.py``), trained with hand-written forward/backward
passes (im2col convolutions) and Adam, then exported with ``onnx.helper`` and verified
with onnxruntime.  Deterministic: fixed seeds, single-threaded BLAS by default.

Architecture (NCHW, every tensor named after the node producing it)::

    input [N,1,32,32]
    conv1 3x3 1->16 pad1, relu1                              32x32
    block1: conv_a 3x3 16->16, relu_a, conv_b 3x3 16->16,
            add (conv_b + relu1)   <- residual skip, relu    32x32
    pool1 maxpool 2x2                                        16x16
    mixed: conv3x3 3x3 16->16 + relu3x3 ‖ conv1x1 1x1 16->16 + relu1x1,
           concat (channels) -> 32                           16x16
    pool2 maxpool 2x2                                        8x8
    conv3 3x3 32->32 pad1, relu3                             8x8
    pool3 maxpool 2x2                                        4x4
    conv4 3x3 32->32 pad1, relu4                             4x4
    gap (GlobalAveragePool), flatten, head/gemm 32->10 -> logits [N,10]

Usage:  python scripts/train_default_model.py [--out DIR] [--epochs E]
"""
from __future__ import annotations

import os

# Modest, deterministic CPU use: one BLAS thread unless the caller says otherwise.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vis_service.default_models import DEFAULT_MODEL_DIR  # noqa: E402
from vis_service.default_models import digits_data  # noqa: E402

SEED = 0
BATCH = 64
EPOCHS = 18
LR = 3e-3
MAX_SHIFT = 2  # random translation (pixels at 32x32) for augmentation
CHECKPOINT_STEPS = (0, 50, 200)  # plus the final step
OPSET = 17
IR_VERSION = 8
F32 = np.float32

# name -> (out_channels, in_channels, kernel)
CONVS = {
    "conv1": (16, 1, 3),
    "block1/conv_a": (16, 16, 3),
    "block1/conv_b": (16, 16, 3),
    "mixed/conv3x3": (16, 16, 3),
    "mixed/conv1x1": (16, 16, 1),
    "conv3": (32, 32, 3),
    "conv4": (32, 32, 3),
}
GEMM = ("head/gemm", 10, 32)  # name, out, in


# ----------------------------------------------------------------------------- layers
def conv_fwd(x, w, b):
    """Stride-1 'same' convolution via im2col. Returns (y, cols)."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
    win = sliding_window_view(xp, (k, k), axis=(2, 3))  # [n,c,h,w,k,k]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, c * k * k)
    y = cols @ w.reshape(o, -1).T + b
    return np.ascontiguousarray(y.reshape(n, h, wd, o).transpose(0, 3, 1, 2)), cols


def conv_bwd(dy, cols, w, x_shape, need_dx=True):
    n, c, h, wd = x_shape
    o, _, k, _ = w.shape
    p = k // 2
    dyf = dy.transpose(0, 2, 3, 1).reshape(-1, o)
    dw = (dyf.T @ cols).reshape(w.shape)
    db = dyf.sum(0)
    if not need_dx:
        return None, dw, db
    dcols = (dyf @ w.reshape(o, -1)).reshape(n, h, wd, c, k, k)
    dxp = np.zeros((n, c, h + 2 * p, wd + 2 * p), dtype=dy.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + h, j:j + wd] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, p:p + h, p:p + wd], dw, db


def pool_fwd(x):
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    am = t.argmax(-1)
    return np.take_along_axis(t, am[..., None], -1)[..., 0], am


def pool_bwd(dy, am):
    n, c, h2, w2 = dy.shape
    t = np.zeros((n, c, h2, w2, 4), dtype=dy.dtype)
    np.put_along_axis(t, am[..., None], dy[..., None], -1)
    return t.reshape(n, c, h2, w2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h2 * 2, w2 * 2)


def relu(x):
    return np.maximum(x, 0)


# ----------------------------------------------------------------------------- model
def init_params(rng):
    params = {}
    for name, (o, i, k) in CONVS.items():
        params[name + "/weight"] = (rng.standard_normal((o, i, k, k)) * np.sqrt(2.0 / (i * k * k))).astype(F32)
        params[name + "/bias"] = np.zeros(o, F32)
    name, o, i = GEMM
    params[name + "/weight"] = (rng.standard_normal((o, i)) * np.sqrt(1.0 / i)).astype(F32)
    params[name + "/bias"] = np.zeros(o, F32)
    return params


def forward(P, x, train=False):
    """Returns logits (and a cache for backward when train=True)."""
    c = {}
    a, c["conv1"] = conv_fwd(x, P["conv1/weight"], P["conv1/bias"])
    h1 = relu(a)
    a, c["conv_a"] = conv_fwd(h1, P["block1/conv_a/weight"], P["block1/conv_a/bias"])
    ha = relu(a)
    a, c["conv_b"] = conv_fwd(ha, P["block1/conv_b/weight"], P["block1/conv_b/bias"])
    hb = relu(a + h1)
    p1, c["pool1"] = pool_fwd(hb)
    a, c["conv_m3"] = conv_fwd(p1, P["mixed/conv3x3/weight"], P["mixed/conv3x3/bias"])
    m3 = relu(a)
    a, c["conv_m1"] = conv_fwd(p1, P["mixed/conv1x1/weight"], P["mixed/conv1x1/bias"])
    m1 = relu(a)
    cat = np.concatenate([m3, m1], axis=1)
    p2, c["pool2"] = pool_fwd(cat)
    a, c["conv3"] = conv_fwd(p2, P["conv3/weight"], P["conv3/bias"])
    h3 = relu(a)
    p3, c["pool3"] = pool_fwd(h3)
    a, c["conv4"] = conv_fwd(p3, P["conv4/weight"], P["conv4/bias"])
    h4 = relu(a)
    g = h4.mean(axis=(2, 3))
    logits = g @ P["head/gemm/weight"].T + P["head/gemm/bias"]
    if not train:
        return logits
    c.update(x=x, h1=h1, ha=ha, hb=hb, p1=p1, m3=m3, m1=m1, p2=p2, h3=h3, p3=p3, h4=h4, g=g)
    return logits, c


def backward(P, c, dlogits):
    G = {}
    G["head/gemm/weight"] = dlogits.T @ c["g"]
    G["head/gemm/bias"] = dlogits.sum(0)
    dg = dlogits @ P["head/gemm/weight"]
    h4 = c["h4"]
    dh4 = np.broadcast_to(dg[:, :, None, None] / (h4.shape[2] * h4.shape[3]), h4.shape)
    dp3, G["conv4/weight"], G["conv4/bias"] = conv_bwd(dh4 * (h4 > 0), c["conv4"], P["conv4/weight"], c["p3"].shape)
    da = pool_bwd(dp3, c["pool3"]) * (c["h3"] > 0)
    dp2, G["conv3/weight"], G["conv3/bias"] = conv_bwd(da, c["conv3"], P["conv3/weight"], c["p2"].shape)
    dcat = pool_bwd(dp2, c["pool2"])
    dm3, dm1 = dcat[:, :16] * (c["m3"] > 0), dcat[:, 16:] * (c["m1"] > 0)
    dp1a, G["mixed/conv3x3/weight"], G["mixed/conv3x3/bias"] = conv_bwd(
        dm3, c["conv_m3"], P["mixed/conv3x3/weight"], c["p1"].shape)
    dp1b, G["mixed/conv1x1/weight"], G["mixed/conv1x1/bias"] = conv_bwd(
        dm1, c["conv_m1"], P["mixed/conv1x1/weight"], c["p1"].shape)
    dhb = pool_bwd(dp1a + dp1b, c["pool1"])
    dsum = dhb * (c["hb"] > 0)
    dha, G["block1/conv_b/weight"], G["block1/conv_b/bias"] = conv_bwd(
        dsum, c["conv_b"], P["block1/conv_b/weight"], c["ha"].shape)
    dh1b, G["block1/conv_a/weight"], G["block1/conv_a/bias"] = conv_bwd(
        dha * (c["ha"] > 0), c["conv_a"], P["block1/conv_a/weight"], c["h1"].shape)
    dh1 = (dsum + dh1b) * (c["h1"] > 0)
    _, G["conv1/weight"], G["conv1/bias"] = conv_bwd(dh1, c["conv1"], P["conv1/weight"], c["x"].shape, need_dx=False)
    return G


def softmax_xent(logits, y):
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    d = p.copy()
    d[np.arange(len(y)), y] -= 1
    return float(loss), (d / len(y)).astype(F32)


def predict(P, x, bs=256):
    return np.concatenate([forward(P, x[i:i + bs]) for i in range(0, len(x), bs)])


class Adam:
    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, grads, lr):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            params[k] -= (lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)).astype(F32)


def augment(x01, rng):
    """Random integer shifts of up to MAX_SHIFT px (zero = black fill). x01: [B,32,32] in [0,1]."""
    s = MAX_SHIFT
    b, h, w = x01.shape
    xp = np.pad(x01, ((0, 0), (s, s), (s, s)))
    off = rng.integers(0, 2 * s + 1, size=(b, 2))
    return np.stack([xp[i, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(off)])


# ----------------------------------------------------------------------------- ONNX export
def build_onnx(P, step: int) -> onnx.ModelProto:
    nodes, inits = [], []

    def init(name):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(P[name], dtype=F32), name))
        return name

    def conv(name, x):
        o, i, k = CONVS[name]
        nodes.append(helper.make_node(
            "Conv", [x, init(name + "/weight"), init(name + "/bias")], [name], name=name,
            kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1], dilations=[1, 1], group=1))
        return name

    def op(op_type, name, inputs, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    t = op("Relu", "relu1", [conv("conv1", "input")])
    skip = t
    t = op("Relu", "block1/relu_a", [conv("block1/conv_a", t)])
    t = conv("block1/conv_b", t)
    t = op("Add", "block1/add", [t, skip])
    t = op("Relu", "block1/relu", [t])
    p1 = op("MaxPool", "pool1", [t], kernel_shape=[2, 2], strides=[2, 2])
    b3 = op("Relu", "mixed/relu3x3", [conv("mixed/conv3x3", p1)])
    b1 = op("Relu", "mixed/relu1x1", [conv("mixed/conv1x1", p1)])
    t = op("Concat", "mixed/concat", [b3, b1], axis=1)
    t = op("MaxPool", "pool2", [t], kernel_shape=[2, 2], strides=[2, 2])
    t = op("Relu", "relu3", [conv("conv3", t)])
    t = op("MaxPool", "pool3", [t], kernel_shape=[2, 2], strides=[2, 2])
    t = op("Relu", "relu4", [conv("conv4", t)])
    t = op("GlobalAveragePool", "gap", [t])
    t = op("Flatten", "flatten", [t], axis=1)
    name = GEMM[0]
    nodes.append(helper.make_node("Gemm", [t, init(name + "/weight"), init(name + "/bias")], ["logits"],
                                  name=name, alpha=1.0, beta=1.0, transB=1))

    graph = helper.make_graph(
        nodes, "digits_resnet",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
        doc_string=f"Residual CNN for sklearn digits (32x32 gray), numpy-trained, step {step}.",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="vis-service/train_default_model.py", producer_version="1")
    model.ir_version = IR_VERSION
    model.model_version = step
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_session(model_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def accuracy(logits, y):
    return float((logits.argmax(1) == y).mean())


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)
    out: Path = args.out
    t0 = time.time()

    data = digits_data.load_split()
    xtr_u8, ytr, xte_u8, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    x01 = xtr_u8.astype(F32) / F32(255)
    mean = round(float(x01.mean()), 4)
    std = round(float(x01.std()), 4)
    print(f"train {len(ytr)}  test {len(yte)}  mean {mean}  std {std}")
    xtr = digits_data.to_input(xtr_u8, mean, std)
    xte = digits_data.to_input(xte_u8, mean, std)

    rng = np.random.default_rng(SEED)
    P = init_params(rng)
    opt = Adam(P, LR)
    steps_per_epoch = int(np.ceil(len(ytr) / BATCH))
    total = steps_per_epoch * args.epochs
    checkpoints = {}  # step -> (model, test acc)

    def snapshot(step):
        m = build_onnx(P, step)
        checkpoints[step] = (m, accuracy(predict(P, xte), yte))

    step = 0
    snapshot(0)
    for epoch in range(args.epochs):
        perm = rng.permutation(len(ytr))
        losses = []
        for bi in range(steps_per_epoch):
            idx = perm[bi * BATCH:(bi + 1) * BATCH]
            xb = augment(x01[idx], rng)
            xb = ((xb - F32(mean)) / F32(std))[:, None].astype(F32)
            logits, cache = forward(P, xb, train=True)
            loss, dl = softmax_xent(logits, ytr[idx])
            grads = backward(P, cache, dl)
            lr = LR * 0.5 * (1 + np.cos(np.pi * step / total))  # cosine decay
            opt.step(P, grads, lr)
            losses.append(loss)
            step += 1
            if step in CHECKPOINT_STEPS:
                snapshot(step)
        te_acc = accuracy(predict(P, xte), yte)
        print(f"epoch {epoch + 1:2d}/{args.epochs} step {step:4d} loss {np.mean(losses):.4f} "
              f"test acc {te_acc:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    snapshot(step)
    train_time = time.time() - t0

    # --- evaluation (numpy) and ONNX Runtime verification
    np_test_logits = predict(P, xte)
    test_acc = accuracy(np_test_logits, yte)
    train_acc = accuracy(predict(P, xtr), ytr)
    final = checkpoints[step][0]
    final_bytes = final.SerializeToString()
    sess = ort_session(final_bytes)
    ort_test_logits = sess.run(["logits"], {"input": xte})[0]
    diff = float(np.abs(ort_test_logits - np_test_logits).max())
    ort_acc = accuracy(ort_test_logits, yte)
    print(f"numpy test acc {test_acc:.4f}  train acc {train_acc:.4f}  ORT test acc {ort_acc:.4f}  "
          f"max |ORT - numpy| {diff:.2e}")
    assert diff < 1e-4, f"ORT and numpy disagree: {diff}"
    assert ort_acc == test_acc, (ort_acc, test_acc)
    assert test_acc >= 0.95, f"test accuracy too low: {test_acc}"

    # --- write outputs
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(final_bytes)
    ck_dir = out / "checkpoints"
    ck_dir.mkdir(exist_ok=True)
    for old in ck_dir.glob("step_*.onnx"):
        old.unlink()
    for s, (m, _) in sorted(checkpoints.items()):
        (ck_dir / f"step_{s:04d}.onnx").write_bytes(m.SerializeToString())
    (out / "labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    config = {
        "name": "digits",
        "input": {"name": "input", "layout": "NCHW", "color": "GRAY", "size": [32, 32],
                  "resize": "stretch", "value_range": [0, 1], "mean": [mean], "std": [std],
                  "invert": False},
        "labels": "labels.txt",
        "description": (
            "Small residual CNN (conv -> residual block with Add -> maxpool -> inception-style "
            "3x3/1x1 branches joined by Concat -> maxpool -> conv -> maxpool -> conv -> global average "
            "pool -> gemm) "
            "trained with numpy on scikit-learn's 8x8 handwritten digits, bilinearly upsampled "
            "to 32x32 grayscale. Images are a WHITE digit on a BLACK background (sklearn "
            "intensities 0..16 with ink = high); dark-on-light images must be inverted first. "
            f"Held-out test accuracy {test_acc:.4f} ({len(yte)} images). Output: 10 logits for "
            "labels 0..9."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- sample PNGs (first test image of each class) and their round trip through config
    from PIL import Image

    smp_dir = out / "samples"
    smp_dir.mkdir(exist_ok=True)
    for old in smp_dir.glob("digit_*.png"):
        old.unlink()
    sample_files = []
    for label in range(10):
        j = int(np.flatnonzero(yte == label)[0])
        path = smp_dir / f"digit_{label}_{int(data['idx_test'][j])}.png"
        Image.fromarray(xte_u8[j], mode="L").save(path, optimize=True)
        sample_files.append((path, label, xte[j]))
    for path, label, x_train_input in sample_files:
        img = Image.open(path).convert("L").resize((32, 32), Image.BILINEAR)
        v = np.asarray(img, dtype=F32) / F32(255)
        x = ((v - F32(mean)) / F32(std))[None, None].astype(F32)
        assert np.abs(x[0] - x_train_input).max() < 1e-6, f"{path.name}: PNG round trip differs"
        pred = int(sess.run(["logits"], {"input": x})[0].argmax())
        assert pred == label, f"{path.name}: predicted {pred}"
    print(f"samples: {len(sample_files)} PNGs round-trip exactly and classify correctly")

    # verify checkpoints load and run
    ck_acc = {}
    for s, (_, acc_np) in sorted(checkpoints.items()):
        p = ck_dir / f"step_{s:04d}.onnx"
        onnx.checker.check_model(str(p))
        acc = accuracy(ort_session(p.read_bytes()).run(["logits"], {"input": xte})[0], yte)
        ck_acc[p.name] = round(acc, 4)
        print(f"checkpoint {p.name}: test acc {acc:.4f} (numpy {acc_np:.4f})")

    metrics = {
        "model": "digits",
        "dataset": "sklearn.datasets.load_digits (1797 images, 8x8 -> 32x32 bilinear)",
        "split": {"function": "vis_service.default_models.digits_data.split_indices",
                  "method": "sklearn.model_selection.train_test_split, stratified",
                  "test_size": digits_data.TEST_SIZE, "random_state": digits_data.SPLIT_SEED,
                  "n_train": int(len(ytr)), "n_test": int(len(yte))},
        "seed": SEED,
        "optimizer": {"name": "adam", "lr": LR, "schedule": "cosine", "batch_size": BATCH,
                      "epochs": args.epochs, "augmentation": f"random shift +-{MAX_SHIFT}px"},
        "steps": step,
        "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4),
        "ort_test_accuracy": round(ort_acc, 4),
        "max_abs_diff_ort_vs_numpy": float(f"{diff:.3g}"),
        "checkpoint_test_accuracy": ck_acc,
        "normalization": {"mean": mean, "std": std},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    print(json.dumps(sizes, indent=1))
    print(f"total {sum(sizes.values())} bytes; training {train_time:.0f}s, all {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
