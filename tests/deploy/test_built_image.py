"""Opt-in: a really built image (deploy/build-image.sh, buildah) run by its own entrypoint.

Not part of CI (building takes minutes and root): set LIFL_TEST_IMAGE=localhost/lifl:0.1.0 after
`sudo bash deploy/build-image.sh`. The container shares this machine's network and PID namespace
(buildah's chroot isolation), so the test reaches it on loopback and sends SIGTERM to its
`lifl serve` as the kubelet would to PID 1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from lifl.client import Client
from lifl.shm import list_segments
from support import assert_matches, fedavg64, perturb, small_model

from .probes import NOT_SERVING, SERVING, check, watch

IMAGE = os.environ.get("LIFL_TEST_IMAGE", "")
pytestmark = pytest.mark.skipif(not IMAGE or not shutil.which("buildah"),
                                reason="opt-in: set LIFL_TEST_IMAGE to an image built by deploy/build-image.sh")
SERVE = [b"/opt/lifl/bin/python", b"/opt/lifl/bin/lifl", b"serve"]


def _descendants(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out += [int(d.name), *_descendants(int(d.name))]
        except OSError:
            continue
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_built_image_serves_aggregates_and_stops_on_sigterm():
    bh = ["buildah", "--storage-driver", "vfs"]
    config = json.loads(subprocess.run([*bh, "inspect", "--type", "image", IMAGE], capture_output=True, text=True,
                                       check=True).stdout)["OCIv1"]["config"]
    command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])  # buildah run wants it spelled out
    assert command == ["lifl", "serve", "--config", "config/lifl.toml"]
    ctr = subprocess.run([*bh, "from", IMAGE], capture_output=True, text=True, check=True).stdout.strip()
    port, mport, prefix = _free_port(), _free_port(), f"lifltest{uuid.uuid4().hex[:8]}"
    env = {"LIFL_HOST": "127.0.0.1", "LIFL_PORT": str(port), "LIFL_METRICS_PORT": str(mport),
           "LIFL_SHM_PREFIX": prefix, "LIFL_TOKENS": "client-token-1", "LIFL_ADMIN_TOKEN": "admin-token-1"}
    run = subprocess.Popen([*bh, "run", "--isolation", "chroot", *(a for k, v in env.items() for a in ("--env", f"{k}={v}")),
                            ctr, "--", *command],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        addr, deadline = f"127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                assert check(addr) == SERVING
                break
            except Exception:
                if time.monotonic() > deadline or run.poll() is not None:
                    raise
                time.sleep(0.3)
        model = small_model(4)
        updates = [perturb(model, s) for s in (5, 6)]
        with Client(addr, token="admin-token-1") as a, Client(addr, token="client-token-1") as c:
            rid = a.open_round(model, expected=2)
            for i, u in enumerate(updates):
                c.push(rid, u, num_examples=3 + i, client_id=f"c{i}")
            assert_matches(c.pull(rid, wait_s=60), fedavg64(updates, [3, 4]))
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            assert 'lifl_rounds_total{outcome="done"} 1.0' in r.read().decode()
        seen = watch(addr)
        assert seen.get(timeout=10) == SERVING
        serve = [p for p in _descendants(run.pid)
                 if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[:3] == SERVE]
        assert len(serve) == 1, "the image's lifl serve process"
        os.kill(serve[0], signal.SIGTERM)
        assert seen.get(timeout=30) == NOT_SERVING
        assert run.wait(60) == 0
        assert list_segments(prefix) == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        subprocess.run([*bh, "rm", ctr], capture_output=True)
