#!/usr/bin/env python3
"""Activations through gRPC vs the same onnxruntime run in-process (goal: overhead ratio <= 1.10).

SqueezeNet 1.0 from ../shared, three layers, batch 8. Both sides use the same
exposed graph and session options; runs are interleaved (each repetition runs the
contestants in another order, each after a short pause so that no call pays for the
server's tail of the one before) and medians compared: the ratio of the medians, and
the median of each repetition's own ratio (paired, robust to the machine's drifts).
Transports: everything through gRPC (the default), and same-host shared memory (`Client(..., shared_memory_bytes=...)`,
README "Same-host shared memory"), where the client writes the input into its region
(inside the timed call) and the server reads it there and has onnxruntime write the
results straight into the region, which the client hands out as views; and the same with
the input built in a region beforehand (`Client.shared_input`: no copy in the call).

Also printed: what loopback gRPC in Python takes to move the same bytes with no work at all
(a bare handler in another process that receives the input as one message and streams back
as many bytes in the service's 1 MiB chunks): the floor of the streamed transport, and
so of its ratio, on this machine.
"""
from __future__ import annotations

import argparse
import itertools
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


CHUNK = 1 << 20  # the service's default result chunk
BARE_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def serve_bare() -> int:
    """A gRPC server whose one method answers a request with N bytes in CHUNK-sized messages,
    N given by the request's first 8 bytes: transport and nothing else."""
    from concurrent import futures

    import grpc

    def send(request: bytes, context):
        total = int.from_bytes(request[:8], "little")
        block = bytes(CHUNK)
        for start in range(0, total, CHUNK):
            yield block[:min(CHUNK, total - start)]

    handler = grpc.method_handlers_generic_handler("bare.Bare", {"Send": grpc.unary_stream_rpc_method_handler(
        send, request_deserializer=lambda b: b, response_serializer=lambda b: b)})
    server = grpc.server(futures.ThreadPoolExecutor(4), options=BARE_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


def bare_transfer(address: str):
    """A call moving x up in one message and out_bytes back in chunks, through the bare server."""
    import grpc

    channel = grpc.insecure_channel(address, options=BARE_OPTIONS + [
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)])
    send = channel.unary_stream("/bare.Bare/Send", request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def transfer(x: np.ndarray, out_bytes: int) -> int:
        request = out_bytes.to_bytes(8, "little") + x.tobytes()
        return sum(len(chunk) for chunk in send(request))
    return channel, transfer


def main() -> int:
    if sys.argv[1:] == ["--serve-bare"]:
        return serve_bare()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--settle-ms", type=float, default=10.0, help="pause before each timed call")
    ap.add_argument("--shm-mib", type=int, default=64, help="shared memory region of the second client (MiB)")
    args = ap.parse_args()
    if not MODEL.is_file():
        print(f"skipped: {MODEL} not found (../shared absent)")
        return 0
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    runtime = Runtime()
    proto = prepare_model(onnx.load(MODEL))
    processes: list[subprocess.Popen] = []

    def start(argv: list[str]) -> str:
        """Start a server process; its address (from the line that says where it listens)."""
        processes.append(subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True))
        for line in processes[-1].stdout:
            if match := re.search(r"listening on (\S+)", line):
                return match.group(1)
        raise RuntimeError(f"{argv} ended without saying where it listens")

    bare_channel = None
    try:
        # the server in its own process, as deployed: sharing one interpreter (and its GIL)
        # with the client would charge the client's work to the service
        address = start(["-m", "vis_service", "serve", "--port", "0", "--log-level", "WARNING", "--preload"])
        bare_channel, transfer = bare_transfer(start([__file__, "--serve-bare"]))
        with Client(address) as client, Client(address, shared_memory_bytes=args.shm_mib << 20) as shm_client:
            model = client.load_model(MODEL, name="squeezenet")
            x_shared = shm_client.shared_input(x.shape, x.dtype)
            x_shared[:] = x
            for title, layers in LAYER_SETS.items():
                local = runtime.create_session(expose_tensors(proto, layers))
                out_bytes = sum(a.nbytes for a in local.run(layers, {"data_0": x}))
                contestants = {
                    "in-process": lambda: dict(zip(layers, local.run(layers, {"data_0": x}))),
                    "streamed": lambda: client.activations(model, x, layers),
                    # writes x into the client's region inside the call: timed
                    "shared memory": lambda: shm_client.activations(model, x, layers),
                    # x built in a region beforehand (Client.shared_input), as a caller decoding
                    # its batch straight into shared memory would: no copy in the call
                    "shm, input in place": lambda: shm_client.activations(model, x_shared, layers),
                    # no model, no service: the same bytes through loopback gRPC (the streamed floor)
                    "bare transfer": lambda: transfer(x, out_bytes),
                }
                for run in contestants.values():  # warm: the server builds its session once
                    run()
                times, outs = {k: [] for k in contestants}, {}
                orders = list(itertools.permutations(contestants))
                for rep in range(args.reps):
                    # every order in turn: what runs just before (cache, CPU and the previous call's
                    # trailing work in the server) weighs on each contestant alike
                    for kind in orders[rep % len(orders)]:
                        time.sleep(args.settle_ms / 1e3)  # what the last call left running in the server ends
                        t0 = time.perf_counter()
                        out = contestants[kind]()
                        times[kind].append(time.perf_counter() - t0)
                        if rep == args.reps - 1:  # kept to check that every transport returns the same bytes
                            outs[kind] = out
                        del out
                assert outs.pop("bare transfer") == out_bytes
                for kind in ("streamed", "shared memory", "shm, input in place"):
                    for name in layers:
                        assert np.array_equal(outs[kind][name], outs["in-process"][name]), (kind, name)
                mb = sum(v.nbytes for v in outs["in-process"].values()) / 2**20
                del outs
                local_times = times.pop("in-process")
                l = statistics.median(local_times)
                print(f"squeezenet activations, batch {args.batch}, {title} {layers} ({mb:.1f} MiB returned)")
                print(f"  in-process onnxruntime:     {l * 1e3:8.1f} ms (median of {args.reps}, interleaved)")
                bare_times = times.pop("bare transfer")
                for kind, t in times.items():
                    g = statistics.median(t)
                    # paired: each repetition's gRPC time over the in-process time of the same repetition
                    # (measured moments apart), so that the machine's slow drifts cancel
                    paired = statistics.median(a / b for a, b in zip(t, local_times))
                    print(f"  gRPC, {kind + ':':22}{g * 1e3:8.1f} ms   overhead ratio {g / l:6.3f}, "
                          f"paired {paired:6.3f}   (goal <= 1.10)")
                b = statistics.median(bare_times)
                print(f"  bare gRPC moving the same bytes (no work): {b * 1e3:.1f} ms: the streamed transport's floor "
                      f"is a ratio of {(l + b) / l:.3f} here")
    finally:
        if bare_channel is not None:
            bare_channel.close()
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
