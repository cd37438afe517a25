"""`python -m vis_service serve` as a process: the port it prints, and the huge-pages restart."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vis_service.default_models import DEFAULT_REPOSITORY
from vis_service.runtime.huge_pages import SWITCH, environment_with_huge_pages, huge_pages_in_use

LINUX = sys.platform.startswith("linux")


def serve(environ: dict[str, str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-X", "utf8", "-m", "vis_service", "serve", "--port", "0", "--log-level", "WARNING",
         "--model-repository", str(DEFAULT_REPOSITORY)],
        stdout=subprocess.PIPE, text=True, env=environ)
    line = process.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    if not match:
        process.kill()
        pytest.fail(f"no address printed: {line!r}")
    return process, match.group(1)


def started_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in raw if entry)


@pytest.mark.skipif(not LINUX, reason="reads /proc/<pid>/environ (Linux)")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_served_process_prints_its_port_and_restarts_with_huge_pages(switch):
    from vis_client import Client

    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ[SWITCH] = switch
    expect_huge = switch == "1" and environment_with_huge_pages(environ) is not None
    process, address = serve(environ)
    try:
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0  # --port 0: a real port
        with Client(address) as client:
            digits = client.model("digits")
            sample = sorted((DEFAULT_REPOSITORY / "digits" / "samples").glob("digit_*.png"))[:1]
            last = client.inspect(digits).nodes[-1].outputs[0]
            out = client.activations(digits, sample, [last])[last]
            assert out.shape[0] == 1 and np.isfinite(out).all()  # the restarted process serves
        # same pid: the restart replaced the process, the port printed is the one serving
        assert huge_pages_in_use(started_environment(process.pid)) == expect_huge
        # the command line ran again as it was, the interpreter's own options included
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:6] == [b"-X", b"utf8", b"-m", b"vis_service", b"serve"]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.skipif(not LINUX, reason="the tunable is glibc's")
def test_huge_pages_environment_rules():
    on = dict(glibc=(2, 36), kernel_allows=True)
    env = environment_with_huge_pages({"PATH": "/bin"}, **on)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert huge_pages_in_use(env)
    # other tunables are kept
    assert environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **on)["GLIBC_TUNABLES"] \
        == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # nothing to do: switched off, already restarted, the caller's own choice, old glibc, no glibc, THP never
    assert environment_with_huge_pages({SWITCH: "0"}, **on) is None
    assert environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, **on) is None
    assert environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **on) is None
    assert not huge_pages_in_use({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert environment_with_huge_pages({}, glibc=(2, 34), kernel_allows=True) is None
    assert environment_with_huge_pages({}, glibc=None, kernel_allows=True) is None
    assert environment_with_huge_pages({}, glibc=(2, 36), kernel_allows=False) is None
