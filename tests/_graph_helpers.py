"""Shared helpers for the graph tests: model locations and a tiny ONNX net builder."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` from anywhere
    sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared"
SHARED_MODELS = {
    "squeezenet1.0": SHARED / "models" / "imagenet" / "squeezenet1.0.onnx",
    "mobilenet_v1": SHARED / "models" / "imagenet" / "mobilenet_v1_0.75_192.onnx",
    "mnist-8": SHARED / "models" / "mnist" / "mnist-8.onnx",
    "resnet20": SHARED / "models" / "cifar10" / "resnet20.onnx",
}
LIGHT_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"
LIGHT_NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
               "shufflenet", "squeezenet", "vgg19", "zfnet512"]
ALL_MODELS = [f"shared:{k}" for k in SHARED_MODELS] + [f"light:{k}" for k in LIGHT_NAMES]

_cache: dict[str, onnx.ModelProto] = {}


def load(model_id: str) -> onnx.ModelProto:
    """Prepared model by id ("shared:resnet20", "light:vgg19"); pytest.skip if absent."""
    import pytest

    from vis_service.graph.loading import parse_model, prepare_model

    if model_id not in _cache:
        kind, name = model_id.split(":", 1)
        path = SHARED_MODELS[name] if kind == "shared" else LIGHT_DIR / f"light_{name}.onnx"
        if not path.is_file():
            where = "shared model directory " + str(SHARED) if kind == "shared" else "onnx wheel test data"
            pytest.skip(f"{path.name} not found ({where} missing)")
        _cache[model_id] = prepare_model(parse_model(path.read_bytes()))
    return _cache[model_id]


class Net:
    """Builds a float NCHW (or NHWC) net; tracks the current tensor and its shape."""

    def __init__(self, c=2, h=20, w=20, seed=0, nhwc=False):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.k = 0
        shape = [1, h, w, c] if nhwc else [1, c, h, w]
        self.input = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
        self.cur, self.c, self.h, self.w = "image", c, h, w
        if nhwc:
            self.cur = self.node("Transpose", [self.cur], perm=[0, 3, 1, 2])

    def name(self, p):
        self.k += 1
        return f"{p}{self.k}"

    def const(self, arr, p="w"):
        n = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    @staticmethod
    def out_size(n, k, s, d, pb, pe, ceil=False):
        keff = (k - 1) * d + 1
        num = n + pb + pe - keff
        return (-(-num // s) if ceil else num // s) + 1

    def conv(self, src=None, cout=3, k=(3, 3), s=(1, 1), d=(1, 1), pads=(0, 0, 0, 0), auto_pad=None, group=1):
        src = src or self.cur
        w = self.rng.uniform(0.1, 1.0, size=(cout, self.c // group, *k)).astype(np.float32)
        attrs = dict(kernel_shape=list(k), strides=list(s), dilations=list(d), group=group)
        if auto_pad:
            attrs["auto_pad"] = auto_pad
        else:
            attrs["pads"] = list(pads)
        out = self.node("Conv", [src, self.const(w)], **attrs)
        if auto_pad:
            self.h, self.w = -(-self.h // s[0]), -(-self.w // s[1])
        else:
            self.h = self.out_size(self.h, k[0], s[0], d[0], pads[0], pads[2])
            self.w = self.out_size(self.w, k[1], s[1], d[1], pads[1], pads[3])
        self.c, self.cur = cout, out
        return out

    def pool(self, op="MaxPool", k=(2, 2), s=(2, 2), pads=(0, 0, 0, 0), ceil=0):
        out = self.node(op, [self.cur], kernel_shape=list(k), strides=list(s), pads=list(pads), ceil_mode=ceil)
        self.h = self.out_size(self.h, k[0], s[0], 1, pads[0], pads[2], bool(ceil))
        self.w = self.out_size(self.w, k[1], s[1], 1, pads[1], pads[3], bool(ceil))
        self.cur = out
        return out

    def relu(self):
        self.cur = self.node("Relu", [self.cur])
        return self.cur

    def model(self, outputs=None, opset=13) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in (outputs or [self.cur])]
        g = helper.make_graph(self.nodes, "net", [self.input], outs, initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m
