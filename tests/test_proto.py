"""The committed gRPC stubs are what the proto generates (regenerate: python scripts/gen_proto.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.name for p in (tmp_path / "lifl" / "v1").iterdir())
    assert generated == ["aggregation_pb2.py", "aggregation_pb2.pyi", "aggregation_pb2_grpc.py"]
    for name in generated:
        fresh = (tmp_path / "lifl" / "v1" / name).read_text()
        committed = (ROOT / "lifl" / "v1" / name).read_text()
        assert fresh == committed, f"lifl/v1/{name} is stale: run `python scripts/gen_proto.py`"
