#!/usr/bin/env python3
"""The main job: start the server, run the client on the embedded model, write PNGs, stop.

    python scripts/demo.py --out out
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vis_client import Client, render
from vis_service.default_models import DEFAULT_MODEL_DIR


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "vis_service", "serve", "--port", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on (\S+)", line or "")
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    proc, address = start_server()
    try:
        with Client(address) as client:
            info = client.server_info()
            print(f"server {address}: vis-service {info['version']}, provider {info['provider']}")
            model = client.model("digits")
            inspection = client.inspect(model)
            print(inspection.summary())
            samples = sorted((DEFAULT_MODEL_DIR / "samples").glob("digit_*.png"))
            convs = [n for n in inspection.nodes if n.op_type == "Conv"]
            adds = [n for n in inspection.nodes if n.op_type == "Add"]
            layers = [convs[0].outputs[0], adds[0].outputs[0], convs[-1].outputs[0]]
            acts = client.activations(model, samples, layers + ["logits"])
            pred = acts["logits"].argmax(1)
            print("predictions:", " ".join(f"{p.stem.split('_')[1]}->{k}" for p, k in zip(samples, pred)))
            for i in (0, 3, 7):
                for name in layers:
                    fname = out / f"activations_{samples[i].stem}_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.png"
                    render.feature_map_grid(acts[name][i], fname, upscale=4)
            for node in (convs[0], convs[-1]):
                w = client.filters(model, node.name)["weight"]
                fname = out / f"filters_{re.sub(r'[^A-Za-z0-9]+', '_', node.name).strip('_')}.png"
                if w.shape[1] == 3:
                    render.rgb_filter_grid(w, fname)
                elif w.shape[1] == 1:  # first layer of a greyscale model: one patch per filter
                    render.grey_filter_grid(w, fname)
                else:
                    render.channel_filter_grid(w, fname)
                print(f"filters {node.name}: {w.shape}")
            grad = client.gradient(model, samples, None)
            for i, path in enumerate(samples[:4]):
                img = np.asarray(Image.open(path).convert("RGB").resize((32, 32)))
                heat = np.abs(grad.gradient[i]).max(axis=0)
                render.heatmap_overlay(img, heat, out / f"saliency_{path.stem}.png")
            print("saliency for classes", [int(k) for k in grad.target_index])

            four = samples[:4]
            ig = client.integrated_gradients(model, four, steps=64)
            cam = client.grad_cam(model, four)
            for i, path in enumerate(four):
                ig.render(i, out / f"integrated_gradients_{path.stem}.png")
                cam.render(i, out / f"gradcam_{path.stem}.png")
            gaps = ", ".join(f"{g:.2g}" for g in ig.extra["completeness_gap"])
            print(f"integrated gradients: completeness gaps {gaps}; Grad-CAM layer {cam.layer}")
            proj = client.deconvnet(model, samples[3], convs[-1].outputs[0], top_k=8, crop=True)
            proj.render_grid(0, out / f"deconvnet_{re.sub(r'[^A-Za-z0-9]+', '_', convs[-1].name)}.png")
            occ = client.occlusion(model, samples[3], patch=8, stride=4)
            occ.render(0, out, stem=f"occlusion_{samples[3].stem}")
            print(f"deconvnet: top channels {[int(c) for c in proj.channels[0]]}; "
                  f"occlusion: most sensitive patch {occ.most_sensitive(0)}")
            scores = []
            for k in (3, 8):
                cm = client.class_model(model, k, steps=120)
                render.save_png(cm.images[0], out / f"class_model_{k}.png")
                scores.append(f"class {k} {float(cm.objective[0]):.2f}")
            print("class models: final class scores:", ", ".join(scores))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    written = sorted(out.glob("*.png"))
    print(f"wrote {len(written)} PNGs under {out}/")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
