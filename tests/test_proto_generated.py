"""The committed protobuf/gRPC code must be what scripts/gen_proto.py makes from proto/."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_client_and_server_share_one_schema():
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    from vis_client.gen import vis_pb2 as client_pb2
    from vis_service.gen import vis_pb2 as server_pb2

    assert client_pb2.DESCRIPTOR.serialized_pb == server_pb2.DESCRIPTOR.serialized_pb


def test_declared_protobuf_minimum_covers_the_generated_code():
    """pip keeps an installed protobuf that meets the declared minimum: below the version the
    generated modules check for at import, `import vis_client` would fail with a VersionError."""
    import re
    import tomllib

    generated = re.search(r"# Protobuf Python Version: ([\d.]+)",
                          (ROOT / "vis_service" / "gen" / "vis_pb2.py").read_text()).group(1)
    need = tuple(int(p) for p in generated.split("."))
    for pyproject in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        minimum = next(re.fullmatch(r"protobuf>=([\d.]+)", d.replace(" ", "")).group(1)
                       for d in deps if d.startswith("protobuf"))
        assert tuple(int(p) for p in minimum.split(".")) >= need, (pyproject, minimum, generated)
