"""`lifl serve --runtime ray`: starting a local Ray cluster, and joining one with --address."""
from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest

pytest.importorskip("ray")

from lifl.client import Client  # noqa: E402
from lifl.demo import start_server  # noqa: E402
from lifl.shm import list_segments  # noqa: E402
from support import assert_matches, fedavg64, perturb, small_model  # noqa: E402


def _round(info: dict, seed: int) -> None:
    base = small_model(seed)
    ups = [perturb(base, seed + i) for i in range(3)]
    gateways = sorted(info["gateways"].values())
    with Client(info["address"]) as admin:
        rid = admin.open_round(base, expected=3)
        for i, u in enumerate(ups):
            with Client(gateways[i % len(gateways)]) as c:
                c.push(rid, u, i + 1.0, f"c{i}")
        assert_matches(admin.pull(rid, wait_s=60), fedavg64(ups, [1.0, 2.0, 3.0]))


def test_serve_starts_ray_and_another_server_joins_it():
    first_prefix, second_prefix = f"lifltest{uuid.uuid4().hex[:8]}", f"lifltest{uuid.uuid4().hex[:8]}"
    first, info = start_server(["--runtime", "ray", "--workers", "2"], first_prefix)
    try:
        assert info["runtime"] == "ray" and info["ray_address"]
        _round(info, 1)
        second, info2 = start_server(["--runtime", "ray", "--address", info["ray_address"], "--workers", "2"],
                                     second_prefix)
        try:
            assert info2["ray_address"] == info["ray_address"]
            _round(info2, 2)
            st = subprocess.run([sys.executable, "-m", "lifl", "status", "--address", info2["address"]],
                                capture_output=True, text=True, timeout=60)
            assert st.returncode == 0 and "node-" in st.stdout and "done" in st.stdout
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    assert list_segments(first_prefix) == [] and list_segments(second_prefix) == []
