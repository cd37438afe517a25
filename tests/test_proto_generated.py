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
