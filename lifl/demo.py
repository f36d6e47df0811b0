"""The demo: a real ``lifl serve`` process, N virtual clients pushing over gRPC, the result checked.

Each client pushes a different random update with the model's layout and a
random number of examples; the demo keeps an independent float64 FedAvg of the
same updates and compares it with the pulled global model element by element.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess  # nosec B404  # starts this package's own `lifl serve`
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import zoo
from .client import Client
from .shm import list_segments


def _update(base: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    out = {}
    for k, v in base.items():
        if v.dtype.kind == "f":
            out[k] = v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(0.01)
        else:
            out[k] = (v + rng.integers(0, 50)).astype(v.dtype)
    return out


def start_server(extra: list[str], prefix: str) -> tuple[subprocess.Popen, dict]:
    """Start ``lifl serve`` on free ports; return the process and its ready info."""
    ready = Path(tempfile.mkdtemp()) / "ready.json"
    env = dict(os.environ, LIFL_SHM_PREFIX=prefix)
    proc = subprocess.Popen([sys.executable, "-m", "lifl", "serve", "--port", "0", "--metrics-port", "0",  # nosec B603  # fixed argv
                             "--ready-file", str(ready)] + extra, env=env)
    t0 = time.monotonic()
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() - t0 > 60:
            proc.kill()
            raise RuntimeError("lifl serve did not start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def run_demo(clients: int = 100, model: str = "resnet18", concurrency: int = 4, leaves: int = 2) -> int:
    base = zoo.layout_arrays(model, seed=0)
    mib = sum(v.nbytes for v in base.values()) / 2**20
    prefix = f"lifldemo{os.getpid()}"
    proc, info = start_server(["--leaves", str(leaves), "--workers", str(leaves)], prefix)
    print(f"demo: lifl serve pid {proc.pid} on {info['address']}; {clients} clients x {model} "
          f"({mib:.1f} MiB each), {concurrency} pushing at once")
    try:
        rng = np.random.default_rng(7)
        weights = rng.integers(10, 500, size=clients).astype(float)
        with Client(info["address"]) as c:
            rid = c.open_round(base, expected=clients)
            ref = {k: np.zeros(v.shape, np.float64) for k, v in base.items()}

            def push(i: int) -> float:
                up = _update(base, i)
                t = time.perf_counter()
                c.push(rid, up, weights[i], client_id=f"client-{i}")
                return time.perf_counter() - t

            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                push_times = list(pool.map(push, range(clients)))
            t_push = time.perf_counter() - t0
            result = c.pull(rid, wait_s=120)
            t_all = time.perf_counter() - t0
            st = c.round_info(rid)
        for i in range(clients):  # the independent reference, after the fact
            for k, v in _update(base, i).items():
                ref[k] += weights[i] * v.astype(np.float64)
        worst = 0.0
        for k, v in result.items():
            r = ref[k] / weights.sum()
            if v.dtype.kind == "f":
                err = np.max(np.abs(v.astype(np.float64) - r) / np.maximum(np.abs(r), 1e-30))
                worst = max(worst, float(err))
            elif not np.array_equal(v, np.rint(r).astype(v.dtype)):
                print(f"demo: MISMATCH in integer tensor {k}")
                return 1
        gb = clients * mib / 1024
        print(f"demo: pushed {gb:.2f} GiB in {t_push:.2f}s ({gb / t_push:.2f} GiB/s over gRPC); "
              f"median push {np.median(push_times) * 1000:.0f} ms")
        print(f"demo: round {rid} {st.state}: {st.accepted} updates, total weight {st.total_weight:g}; "
              f"post-arrival latency {st.post_arrival_seconds * 1000:.1f} ms; pulled after {t_all:.2f}s")
        ok = worst <= 1e-6
        print(f"demo: max relative error vs float64 numpy FedAvg = {worst:.2e} -> {'OK' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        left = list_segments(prefix)
        print(f"demo: server stopped; shared-memory segments left: {len(left)}")
