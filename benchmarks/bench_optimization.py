#!/usr/bin/env python3
"""Optimization loops: onnxruntime (this service's loop) vs the same loop in PyTorch autograd.

Goal: ORT steps/s >= 1.5x PyTorch's, 224x224, ResNet-50.

Both sides run the SAME network with the SAME weights: a ResNet-50 written out here in
torch (no torchvision), random weights, BN in inference mode, exported with
torch.onnx.export; the service side loads the exported ONNX. Same loops on both sides:
- activation maximization: Lucid Fourier parameterization (1/f, decorrelated colour,
  sigmoid), random circular jitter (8 px), ImageNet normalization, objective = one class
  logit, Adam lr 0.05 (scale/rotation off: torch has no cheap bilinear adjoint to compare);
- inversion: the class scores of a reference image, pixel variable in units of B = 80,
  alpha-norm (alpha 6) + TV^2, momentum SGD.
The service side runs the method in-process (methods.optimization, no gRPC), after one
warm-up call that builds the cached session; the torch side after one warm-up step.
Runs alternate and medians are compared (the machine is shared: compare the ratio).
Also times `light_resnet50` from the onnx wheel (architecture-only graph) on the ORT side.

    pip install torch   # the optional `bench` extra; the benchmark skips without it
    python benchmarks/bench_optimization.py [--steps 10] [--reps 3]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASS = 207
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------
# torch side


def torch_resnet50(torch):
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(blocks):
                    layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                    cin = width * 4
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(2048, 1000)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    net = ResNet50().eval()
    with torch.no_grad():  # non-trivial BN statistics so the net is not the identity-ish default
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def export_onnx(torch, net) -> bytes:
    buf = io.BytesIO()
    x = torch.zeros(1, 3, 224, 224)
    kw = dict(input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
              opset_version=17)
    try:
        torch.onnx.export(net, (x,), buf, dynamo=False, **kw)
    except TypeError:  # older torch without the `dynamo` switch
        torch.onnx.export(net, (x,), buf, **kw)
    return buf.getvalue()


def torch_maximize(torch, net, steps, seed=0):
    """Lucid's loop in torch: fft param -> decorrelate -> sigmoid -> jitter -> normalize -> logit."""
    from vis_service.methods.optimization.parameterization import COLOR_CORRELATION

    g = torch.Generator().manual_seed(seed)
    h = w = 224
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    scale = (1.0 / torch.clamp(torch.sqrt(fx ** 2 + fy ** 2), min=1.0 / max(h, w))) * (h * w) ** 0.5
    params = (torch.randn(1, 3, h, w // 2 + 1, 2, generator=g) * 0.01).requires_grad_(True)
    color = torch.tensor(COLOR_CORRELATION, dtype=torch.float32)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    opt = torch.optim.Adam([params], lr=0.05)
    for _ in range(steps):
        spec = torch.complex(params[..., 0], params[..., 1]) * scale
        t = torch.fft.irfft2(spec, s=(h, w)) / 4.0
        t = torch.einsum("cd,bdhw->bchw", color, t)
        d = torch.sigmoid(t)
        dy, dx = (int(v) for v in torch.randint(-8, 9, (2,), generator=g))
        x = (torch.roll(d, (dy, dx), dims=(2, 3)) - mean) / std
        loss = -net(x)[0, CLASS]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(-loss.detach())


def torch_invert(torch, net, reference, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        phi0 = net(torch.from_numpy(reference))
    ref_sq = float((phi0 ** 2).sum())
    z = (torch.randn(1, 3, 224, 224, generator=g) * 0.1).requires_grad_(True)
    opt = torch.optim.SGD([z], lr=0.02, momentum=0.9)
    b, v = 80.0, 80.0 / 6.5
    for _ in range(steps):
        x = ((127.5 + b * z) / 255.0 - mean) / std
        feat = ((net(x) - phi0) ** 2).sum() / ref_sq
        alpha = (z.abs() ** 6).sum() / (224 * 224)
        dy = torch.nn.functional.pad(z[..., 1:, :] - z[..., :-1, :], (0, 0, 0, 1))
        dx = torch.nn.functional.pad(z[..., :, 1:] - z[..., :, :-1], (0, 1, 0, 0))
        tv = ((dy ** 2 + dx ** 2) * (b / v) ** 2 + 1e-8).sum() / (224 * 224)
        loss = feat + 1e-4 * alpha + 5e-3 * tv
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(feat)


# ----------------------------------------------------------------------------
# service side


def service_model(data: bytes, name: str, preset: str = "imagenet", threads: int = 0):
    from vis_service.gen import vis_pb2
    from vis_service.models.config import resolve_image_spec
    from vis_service.models.store import ModelStore
    from vis_service.runtime.sessions import Runtime

    runtime = Runtime(intra_op_threads=threads)
    store = ModelStore(runtime)
    model = store.upload(data, name, vis_pb2.ModelConfig(preset=preset))
    spec = resolve_image_spec(model.config, None, model.image_input, model.infos[model.image_input].shape)
    return runtime, model, spec


def ort_maximize(runtime, model, spec, steps, seed=0):
    from vis_service.methods.optimization import MaximizeSettings, maximize
    from vis_service.methods.optimization.objectives import Term
    from vis_service.methods.optimization.transforms import TransformSettings
    from vis_service.methods.progress import NO_PROGRESS

    s = MaximizeSettings([Term("class_score", index=CLASS)], steps=steps, seed=seed,
                         transforms=TransformSettings(jitter=8))
    return float(maximize(runtime, model, spec, s, NO_PROGRESS).tensors["objective"][0])


def ort_invert(runtime, model, spec, reference, steps, seed=0):
    from vis_service.methods.optimization import InvertSettings, invert
    from vis_service.methods.progress import NO_PROGRESS

    s = InvertSettings(steps=steps, seed=seed)
    return float(invert(runtime, model, spec, reference, s, NO_PROGRESS).tensors["feature_error"][0, 0])


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed run (default 10)")
    ap.add_argument("--reps", type=int, default=3, help="alternating timed runs per side (default 3)")
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads for both sides (default 0: each library's default)")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: PyTorch is not installed (optional `bench` extra: pip install torch)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    net = torch_resnet50(torch)
    data = export_onnx(torch, net)
    runtime, model, spec = service_model(data, "resnet50_torch", threads=args.threads)
    reference = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    # numerical agreement of the two networks (same weights)
    with torch.no_grad():
        t_out = net(torch.from_numpy(reference)).numpy()
    from vis_service.methods.activations import compute_activations
    o_out = compute_activations(runtime, model, {model.image_input: reference}, [model.output_names[0]])
    diff = float(np.abs(t_out - next(iter(o_out.values()))).max() / np.abs(t_out).max())
    print(f"ResNet-50 (torch, random weights, exported to ONNX): max rel. logit difference {diff:.2e}")
    print(f"threads: torch {torch.get_num_threads()}, onnxruntime {args.threads or 'default'}; {args.steps} steps per run, "
          f"{args.reps} alternating runs, medians")

    # warm-up: session build (ORT) and first-call allocations (torch)
    ort_maximize(runtime, model, spec, 1)
    ort_invert(runtime, model, spec, reference, 1)
    torch_maximize(torch, net, 1)
    torch_invert(torch, net, reference, 1)
    rows = []
    for label, ort_fn, torch_fn in (
            ("activation maximization", lambda: ort_maximize(runtime, model, spec, args.steps),
             lambda: torch_maximize(torch, net, args.steps)),
            ("feature inversion", lambda: ort_invert(runtime, model, spec, reference, args.steps),
             lambda: torch_invert(torch, net, reference, args.steps))):
        t_ort, t_torch = [], []
        for _ in range(args.reps):
            t_ort.append(timed(ort_fn))
            t_torch.append(timed(torch_fn))
        o, t = args.steps / statistics.median(t_ort), args.steps / statistics.median(t_torch)
        rows.append((label, o, t))
    print(f"{'224x224 ResNet-50':28s} {'ORT it/s':>9s} {'torch it/s':>11s} {'ratio':>6s}")
    for label, o, t in rows:
        print(f"{label:28s} {o:9.2f} {t:11.2f} {o / t:5.2f}x  (goal >= 1.5x)")

    import onnx

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    if light.is_file():
        lrt, lmodel, lspec = service_model(light.read_bytes(), "light_resnet50", threads=args.threads)
        ort_maximize(lrt, lmodel, lspec, 1)
        t = statistics.median(timed(lambda: ort_maximize(lrt, lmodel, lspec, args.steps)) for _ in range(args.reps))
        print(f"light_resnet50 (onnx wheel, ORT only): activation maximization {args.steps / t:.2f} it/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
