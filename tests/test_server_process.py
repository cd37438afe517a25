"""`python -m vis_service serve` as a process: the free port it picks, prints and serves on."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from vis_service.default_models import DEFAULT_REPOSITORY


def test_served_process_prints_its_port_and_serves():
    from vis_client import Client

    process = subprocess.Popen(
        [sys.executable, "-m", "vis_service", "serve", "--port", "0", "--log-level", "WARNING",
         "--model-repository", str(DEFAULT_REPOSITORY)],
        stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            pytest.fail(f"no address printed: {line!r}")
        address = match.group(1)
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0  # --port 0: a real port
        with Client(address) as client:
            digits = client.model("digits")
            sample = sorted((DEFAULT_REPOSITORY / "digits" / "samples").glob("digit_*.png"))[:1]
            last = client.inspect(digits).nodes[-1].outputs[0]
            out = client.activations(digits, sample, [last])[last]
            assert out.shape[0] == 1 and np.isfinite(out).all()
    finally:
        process.terminate()
        process.wait(timeout=30)
