#!/usr/bin/env python3
"""What an activation's backward rule costs: forward + input gradient of a small all-Conv net,
per activation, with the rules' blocked forms and with their general forms, in one run.

The net: four 3x3 Convs of 64 channels on 56x56 maps, each followed by the activation, then
a global average pool ([8, 64, 56, 56] activations at batch 8). ReLU is the reference (its mask
is one ramp and one product). "blocked" is what the engine builds: on 4-D float32 tensors whose
channels fill onnxruntime's NCHWc blocks, the slopes are HardSigmoid ramps and depthwise 1x1
Convs (with the Add and activation after them fused), so the elementwise work stays in the
blocked layout the Convs run in. "general" is the same graph built with the general forms
(comparisons, Casts, scalar arithmetic), which onnxruntime runs in NCHW with layout reorders
around them; it is what the rules emit for other shapes and dtypes. Both are timed
interleaved in one process; ratio = general / blocked forward+gradient time.

    python benchmarks/bench_activation_rules.py [--batch 8] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vis_service.engine.rules.activations as activation_rules  # noqa: E402
from vis_service.engine import build_gradient_model  # noqa: E402
from vis_service.graph.loading import prepare_model  # noqa: E402
from vis_service.runtime.sessions import Runtime  # noqa: E402

CHANNELS, SIZE, LAYERS = 64, 56, 4
ACTIVATIONS = {  # op type -> (attributes, extra constant inputs)
    "Relu": ({}, {}),
    "Clip (ReLU6)": ({}, {"lo": 0.0, "hi": 6.0}),
    "HardSwish": ({}, {}),
    "LeakyRelu": ({"alpha": 0.1}, {}),
    "Sigmoid": ({}, {}),
    "Tanh": ({}, {}),
}


def conv_net(label: str):
    op = label.split()[0]
    attrs, bounds = ACTIVATIONS[label]
    rng = np.random.default_rng(0)
    nodes, inits, previous = [], [], "x"
    for name, value in bounds.items():
        inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
    for i in range(LAYERS):
        weight = (rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) / np.sqrt(9 * CHANNELS) * 2).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node(op, [f"c{i}", *bounds], [f"a{i}"], **attrs))
        previous = f"a{i}"
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["y"])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS])], inits)
    return prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def gradient_session(runtime: Runtime, model, general: bool):
    blocked = activation_rules._blocked_channels
    if general:  # the rules' general forms: as for tensors whose channels do not fill blocks
        activation_rules._blocked_channels = lambda ctx, y: None
    try:
        graph = build_gradient_model(model, ["y"], ["x"])
    finally:
        activation_rules._blocked_channels = blocked
    session = ort.InferenceSession(graph.model.SerializeToString(), runtime.session_options_for(graph.model),
                                   providers=runtime.choice.providers)
    return graph, session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    runtime = Runtime(provider="cpu")
    print(f"onnxruntime {ort.__version__}; {LAYERS} layers of Conv 3x3 + activation, "
          f"[{args.batch}, {CHANNELS}, {SIZE}, {SIZE}] activations")
    x = np.random.default_rng(1).standard_normal((args.batch, CHANNELS, SIZE, SIZE)).astype(np.float32)
    for label in ACTIVATIONS:
        model = conv_net(label)
        forward = ort.InferenceSession(model.SerializeToString(), runtime.session_options_for(model),
                                       providers=runtime.choice.providers)
        runs = {"forward": (forward, None, {"x": x})}
        for form in ("blocked", "general"):
            graph, session = gradient_session(runtime, model, general=form == "general")
            feeds = {"x": x, graph.cotangent_inputs["y"]: np.ones((args.batch, CHANNELS), np.float32)}
            runs[form] = (session, [graph.gradient_outputs["x"]], feeds)
        times = {name: [] for name in runs}
        for _ in range(2):
            for session, fetch, feeds in runs.values():
                session.run(fetch, feeds)
        for _ in range(args.repeats):
            for name, (session, fetch, feeds) in runs.items():
                start = time.perf_counter()
                session.run(fetch, feeds)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"{label:14s} forward {med['forward']:6.1f} ms; forward+gradient blocked {med['blocked']:6.1f} ms "
              f"({med['blocked'] / med['forward']:.2f}x forward), general {med['general']:6.1f} ms "
              f"({med['general'] / med['forward']:.2f}x); general / blocked {med['general'] / med['blocked']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
