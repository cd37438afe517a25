"""Cost of an input gradient relative to the forward pass, and graph build time.

Prints, for ResNet-style (light_resnet50), MobileNet-style (shared mobilenet) and
DenseNet-style (light_densenet121) networks at batch 1 and 8, the median time of
forward + input gradient divided by the median forward time (goal <= 2.2; also the
ratio of the fastest runs, less sensitive to a noisy machine), and the
time build_gradient_model takes on light_resnet50 (goal < 2 s). Where torch is installed
(the bench extra), also the same ratio for PyTorch autograd on a torchvision-style
ResNet-50, a MobileNetV1 and a torchvision-style DenseNet-121, and ours on those networks
exported to ONNX: what a mature framework's backward costs on this machine, for scale.

Both sessions are made by the service's own Runtime (CPU provider unless --provider cuda),
with its options and the hints the built graph carries (e.g. forward-first node order for
residual graphs). Runs alternate between the two sessions so that noisy neighbours hit both
alike. On CUDA both runs take numpy inputs and return numpy outputs, so each includes its
host <-> device copies (the forward returns the logits, the gradient run the input gradient).

With --floor, each network is also timed with a graph whose ReLU / ReLU6 backward is the
identity (wrong gradients: timing only): what the rest of the backward graph costs on this
runtime. An exact ReLU mask is at least one elementwise pass over the activation (read from
the output, so the forward keeps its fused Conv+Relu), so no exact graph goes under that ratio.

    python benchmarks/bench_gradient.py [--repeats 9] [--provider cuda] [--floor]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vis_service.engine import build_gradient_model  # noqa: E402
from vis_service.graph.expose import expose_tensors  # noqa: E402
from vis_service.graph.loading import prepare_model  # noqa: E402
from vis_service.runtime.sessions import Runtime  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SHARED = REPO / ".." / "shared" / "models"
MODELS = {
    "resnet (light_resnet50)": LIGHT / "light_resnet50.onnx",
    "mobilenet (shared mobilenet_v1_0.75_192)": SHARED / "imagenet" / "mobilenet_v1_0.75_192.onnx",
    "densenet (light_densenet121)": LIGHT / "light_densenet121.onnx",
}


def randomize_constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Light models hold constant-valued weights (ConstantOfShape) whose activations
    overflow; random He-scaled weights keep the arithmetic in normal float range."""
    rng = np.random.default_rng(0)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = [int(d) for d in inits[node.input[0]]]
            scale = np.sqrt(2.0 / np.prod(shape[1:])) if len(shape) > 1 else None
            value = rng.standard_normal(shape) * scale if scale else rng.uniform(0.5, 1.5, shape)
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


_RUNTIME: Runtime | None = None


def runtime(provider: str = "cpu") -> Runtime:
    """The one Runtime of this process, made on first use with `provider`."""
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime(provider=provider)
    return _RUNTIME


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return runtime().create_session(model)


def logits_of(model: onnx.ModelProto) -> str:
    last = model.graph.node[-1]
    return last.input[0] if last.op_type == "Softmax" else model.graph.output[0].name


# --floor: a rule set of this process only, whose Relu / Clip backward passes the gradient through
UNMASKED = "unmasked-timing-only"


def _unmasked(ctx, node, grad_outputs):
    return [grad_outputs[0]] + [None] * (len(node.input) - 1)


def define_unmasked_rule_set() -> None:
    from vis_service.engine.registry import RULE_SETS, RULES

    if UNMASKED not in RULE_SETS:
        RULES.define_rule_set(UNMASKED)
        for op_type in ("Relu", "Clip"):
            RULES.register(op_type, _unmasked, UNMASKED)


def bench_model(label: str, path: Path, batches: list[int], repeats: int, breakdown: bool = False,
                floor: bool = False) -> None:
    if not path.is_file():
        print(f"{label:44s} skipped: {path} not found")
        return
    model = prepare_model(randomize_constant_weights(onnx.load(str(path))))
    bench_loaded(label, model, batches, repeats, breakdown)
    if floor:
        define_unmasked_rule_set()
        bench_loaded(f"{label}, unmasked", model, batches, repeats, rule_set=UNMASKED)


def bench_loaded(label: str, model: onnx.ModelProto, batches: list[int], repeats: int,
                 breakdown: bool = False, rule_set: str = "gradient") -> None:
    objective = logits_of(model)
    image = model.graph.input[0].name
    forward = session(expose_tensors(model, [objective]))
    graph = build_gradient_model(model, [objective], [image], rule_set=rule_set)
    backward = session(graph.model)
    cotangent_name = graph.cotangent_inputs[objective]
    fetch = [graph.gradient_outputs[image]]
    for batch in batches:
        shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        y = forward.run(None, {image: x})[0]
        feeds = {image: x, cotangent_name: np.ones_like(y)}
        backward.run(fetch, feeds)   # warm-up (allocations, kernel selection)
        forward_times, backward_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            forward.run(None, {image: x})
            forward_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            backward.run(fetch, feeds)
            backward_times.append(time.perf_counter() - start)
        f, b = statistics.median(forward_times), statistics.median(backward_times)
        # best-of: each side's fastest run, the least disturbed by neighbours on a shared machine
        best = min(backward_times) / min(forward_times)
        print(f"{label:44s} batch {batch}: forward {f * 1e3:8.1f} ms, forward+gradient {b * 1e3:8.1f} ms, "
              f"ratio {b / f:5.2f} (best-of {best:4.2f})  " + ("(goal <= 2.2)" if rule_set == "gradient" else "(timing only)"))
        if breakdown and batch == max(batches):
            print_breakdown(expose_tensors(model, [objective]), {image: x}, graph.model, feeds, fetch)


GRADIENT_PREFIX = "grad/"  # the backward builder names what it adds grad/<forward node or tensor>/<op>_<k>;
# onnxruntime names the nodes it rewrites after their output (grad/n3/Conv_12_nchwc)


def kernel_times(model: onnx.ModelProto, feeds: dict, fetch: list[str] | None, runs: int,
                 warmup: int = 2) -> dict[tuple[str, str], float]:
    """Mean kernel time per run (seconds) of each node in onnxruntime's profile: (node name, op type) -> s.

    The first `warmup` runs are left out (the first two runs of a large graph are slower: its
    memory arena and allocation plan settle); the profile cannot be switched on later, so the
    node events are kept by the time window of the runs that count.
    """
    import json
    options = runtime().session_options_for(model)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=runtime().choice.providers)
        for _ in range(warmup + runs):
            sess.run(fetch, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
    times: dict[tuple[str, str], float] = {}
    for e in events:
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and any(start <= e["ts"] <= end for start, end in windows)):
            key = (e["name"][:-len("_kernel_time")], e["args"].get("op_name", "?"))
            times[key] = times.get(key, 0.0) + e["dur"] * 1e-6 / len(windows)
    return times


# forward ops whose backward rules build 0/1 or slope masks, some as depthwise 1x1 Convs fused
# with a HardSigmoid ramp (engine/rules/activations.py): those Convs are mask work, not adjoints
MASKED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh"}


def kernel_kind(name: str, op: str, forward_ops: dict[str, str]) -> str:
    """What a profiled node of the forward+gradient graph is: forward part, layout reorder or
    backward op (`forward_ops`: forward node name -> op type, to tell mask Convs from adjoints)."""
    if op.startswith("Reorder"):
        return "layout reorders NCHW <-> NCHWc"
    if not name.startswith(GRADIENT_PREFIX):
        return "forward part"
    if op in ("Conv", "ConvTranspose"):
        label = name[len(GRADIENT_PREFIX):].rsplit("/", 1)[0]   # the forward node (its op type if unnamed)
        if forward_ops.get(label, label) in MASKED_ACTIVATIONS:
            return "backward mask Conv (fused ramps)"
        return "backward Conv / ConvTranspose"
    if op in ("Sum", "Add"):
        return "backward Sum / Add"
    return f"backward {op}"


def print_breakdown(forward: onnx.ModelProto, forward_feeds: dict, gradient: onnx.ModelProto, feeds: dict,
                    fetch: list[str], runs: int = 5) -> None:
    """Where the gradient's time goes, from onnxruntime's per-node profile (kernel times only).

    Groups the forward+gradient graph's kernels into its forward part, onnxruntime's layout
    reorders and the backward nodes by op type: Conv / ConvTranspose (the adjoint convolutions,
    the work no backward pass can skip, about the forward's multiply-adds again; apart, the
    depthwise 1x1 Convs that some activation masks fuse into), HardSigmoid (activation masks),
    Mul (masks times gradients, scales), Sum / Add (gradient contributions), MaxPool /
    ScatterElements / ConstantOfShape (max-pool switches and routing), Split (concat
    gradients), ... Then the ratio there would be if only the forward session and the
    backward convolutions cost anything.
    """
    forward_total = sum(kernel_times(forward, forward_feeds, None, runs).values())
    forward_ops = {node.name: node.op_type for node in gradient.graph.node if node.name}
    by_kind: dict[str, float] = {}
    for (name, op), t in kernel_times(gradient, feeds, fetch, runs).items():
        kind = kernel_kind(name, op, forward_ops)
        by_kind[kind] = by_kind.get(kind, 0.0) + t
    total = sum(by_kind.values())
    print(f"    kernel time per run: forward session {forward_total * 1e3:.1f} ms, forward+gradient {total * 1e3:.1f} ms "
          f"(ratio {total / forward_total:.2f}); in units of the forward session:")
    shown = 0.0
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        if t >= 0.01 * total:
            shown += t
            print(f"      {kind:40s} {t * 1e3:8.1f} ms  {t / forward_total:5.2f}")
    print(f"      {'other':40s} {(total - shown) * 1e3:8.1f} ms  {(total - shown) / forward_total:5.2f}")
    convolutions = by_kind.get("backward Conv / ConvTranspose", 0.0)
    print(f"    ratio if only the forward session and the backward convolutions cost anything: "
          f"{(forward_total + convolutions) / forward_total:.2f}")


REFERENCE_MODELS = {  # torch_models name -> label
    "resnet50": "torchvision-style ResNet-50",
    "mobilenet_v1_0.75": "MobileNetV1 0.75 (224)",
    "densenet121": "torchvision-style DenseNet-121",
}


def bench_torch_reference(batches: list[int], repeats: int, device: str = "cpu", breakdown: bool = False) -> None:
    """The same ratio for PyTorch autograd on this machine, and ours on the same networks.

    Each network of REFERENCE_MODELS (benchmarks/torch_models.py, seeded, BatchNorm
    calibrated) runs in torch (forward under inference_mode; forward + input gradient with
    the weights frozen, so autograd differentiates only the data path, as our graph does) and,
    exported to ONNX by bench_attribution.export_onnx, through our engine. Needs the bench
    extra (torch). `device` "cuda": torch on the GPU (each timed call ends with a synchronize).
    """
    try:
        import torch
    except ImportError:
        print("PyTorch reference skipped: install the bench extra (pip install -e '.[bench]')")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_models
    from bench_attribution import export_onnx

    if device == "cuda" and not torch.cuda.is_available():
        print("PyTorch reference skipped: torch sees no CUDA device")
        return
    torch.set_num_threads(os.cpu_count() or 1)

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for name, label in REFERENCE_MODELS.items():
        net = torch_models.seeded_model(name, seed=0)
        for p in net.parameters():
            p.requires_grad_(False)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            how = export_onnx(net, path)
            model = prepare_model(onnx.load(str(path)))
        print(f"{label + ', ours':44s} (exported with the {how})")
        bench_loaded(f"{label}, ours", model, batches, repeats, breakdown)
        net = net.to(device)
        for batch in batches:
            x = torch.from_numpy(np.random.default_rng(0).random((batch, 3, 224, 224), dtype=np.float32)).to(device)

            def forward():
                with torch.inference_mode():
                    net(x)
                synchronize()

            def gradient():
                xg = x.clone().requires_grad_(True)
                out = net(xg)
                out.backward(torch.ones_like(out))
                synchronize()
                return xg.grad

            gradient()  # warm-up
            forward_times, backward_times = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                forward()
                forward_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                gradient()
                backward_times.append(time.perf_counter() - start)
            f, b = statistics.median(forward_times), statistics.median(backward_times)
            print(f"{label + ', PyTorch ' + torch.__version__:44s} batch {batch}: forward {f * 1e3:8.1f} ms, "
                  f"forward+gradient {b * 1e3:8.1f} ms, ratio {b / f:5.2f} "
                  f"(best-of {min(backward_times) / min(forward_times):4.2f})  (reference)")


def bench_build_time(repeats: int) -> None:
    # with its ~100 MB of weights as initializers, as a real ResNet-50 would carry them
    model = prepare_model(randomize_constant_weights(onnx.load(str(LIGHT / "light_resnet50.onnx"))))
    objective = logits_of(model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build_gradient_model(model, [objective], [model.graph.input[0].name])
        times.append(time.perf_counter() - start)
    print(f"build_gradient_model(light_resnet50): median {statistics.median(times):.3f} s over {repeats} "
          f"(includes opset 9 -> 16 conversion; goal < 2 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="execution provider of both sessions (cuda: fails where CUDA cannot run)")
    parser.add_argument("--breakdown", action="store_true",
                        help="after each network's largest batch, where the gradient's kernel time goes "
                             "(onnxruntime's profile: backward convolutions, masks, pooling, reorders)")
    parser.add_argument("--floor", action="store_true",
                        help="also time each network with its ReLU / ReLU6 backward as the identity (wrong "
                             "gradients): the ratio an exact graph cannot go under on this runtime")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the PyTorch reference (it runs where torch, the bench extra, is installed)")
    args = parser.parse_args()
    choice = runtime(args.provider).choice
    if args.provider == "cuda" and choice.name != "CUDAExecutionProvider":
        print(f"CUDA requested but not usable: {choice.note}")
        sys.exit(2)
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, provider {choice.name}")
    bench_build_time(args.repeats)
    for label, path in MODELS.items():
        bench_model(label, path, args.batches, args.repeats, args.breakdown, args.floor)
    if not args.no_torch:
        bench_torch_reference(args.batches, args.repeats, args.provider, args.breakdown)


if __name__ == "__main__":
    main()
