#!/usr/bin/env python3
"""Activations through gRPC vs the same onnxruntime run in-process (goal: overhead ratio <= 1.10).

SqueezeNet 1.0 from ../shared, three layers, batch 8. Both sides use the same
exposed graph and session options; runs are interleaved and medians compared.
Two transports for the result tensors: streamed through gRPC (the default) and
same-host shared memory (`Client(..., shared_memory_bytes=...)`, README "Same-host
shared memory"), where the server writes the tensors into the client's region.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from vis_client import Client
from vis_service.graph.expose import expose_tensors
from vis_service.graph.loading import prepare_model
from vis_service.runtime.sessions import Runtime

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = SHARED / "models" / "imagenet" / "squeezenet1.0.onnx"
# Two requests: three late feature maps (a few MiB back), and early+mid+late (32 MiB back at
# batch 8), where the transfer itself, not the service, sets the floor (loopback gRPC in
# Python moves about 1 GB/s on this kind of machine).
LAYER_SETS = {
    "late layers": ["fire8/concat_1", "fire9/concat_1", "conv10_1"],
    "early+mid+late": ["conv1_2", "fire5/concat_1", "fire9/concat_1"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shm-mib", type=int, default=64, help="shared memory region of the second client (MiB)")
    args = ap.parse_args()
    if not MODEL.is_file():
        print(f"skipped: {MODEL} not found (../shared absent)")
        return 0
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    runtime = Runtime()
    proto = prepare_model(onnx.load(MODEL))
    # the server in its own process, as deployed: sharing one interpreter (and its GIL)
    # with the client would charge the client's work to the service
    server = subprocess.Popen([sys.executable, "-m", "vis_service", "serve", "--port", "0", "--log-level", "WARNING",
                               "--preload"], stdout=subprocess.PIPE, text=True)
    address = re.search(r"listening on (\S+)", server.stdout.readline()).group(1)
    try:
        with Client(address) as client, Client(address, shared_memory_bytes=args.shm_mib << 20) as shm_client:
            model = client.load_model(MODEL, name="squeezenet")
            transports = {"streamed": client, "shared memory": shm_client}
            for title, layers in LAYER_SETS.items():
                local = runtime.create_session(expose_tensors(proto, layers))
                for c in transports.values():  # warm: the server builds its session once
                    c.activations(model, x, layers)
                local.run(layers, {"data_0": x})
                t_local, times = [], {k: [] for k in transports}
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    expected = local.run(layers, {"data_0": x})
                    t_local.append(time.perf_counter() - t0)
                    for kind, c in transports.items():
                        t0 = time.perf_counter()
                        out = c.activations(model, x, layers)
                        times[kind].append(time.perf_counter() - t0)
                for name, want in zip(layers, expected):  # both transports return the same bytes
                    assert np.array_equal(out[name], want), name
                mb = sum(v.nbytes for v in out.values()) / 2**20
                l = statistics.median(t_local)
                print(f"squeezenet activations, batch {args.batch}, {title} {layers} ({mb:.1f} MiB returned)")
                print(f"  in-process onnxruntime:     {l * 1e3:8.1f} ms (median of {args.reps}, interleaved)")
                for kind, t in times.items():
                    g = statistics.median(t)
                    print(f"  gRPC, {kind + ':':22}{g * 1e3:8.1f} ms   overhead ratio {g / l:6.3f}   (goal <= 1.10)")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
