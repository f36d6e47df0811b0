"""Regenerate the gRPC stubs in lifl/v1/ from proto/lifl/v1/*.proto.

Run: ``python scripts/gen_proto.py [OUT_DIR]`` (default: the repository root).
The stale-stub test calls this into a temporary folder and compares.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "proto").rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, pinned in pyproject

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}"] + [str(p) for p in PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out / "lifl" / "v1").glob("*.py*") if p.name != "__init__.py")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(target):
        print(path)
