"""Costs measured on this machine, which the virtual-time model replays (cached per machine and size).

* fold: ``lifl.fold`` kernels on the model's layout — one update alone, a fused
  batch of 16 (giving the fuse speed-up), one float64 partial, the finalize;
* cold start: a real aggregator function started by the local runtime;
* ingest: real pushes through a real ``lifl serve`` from the real client pool,
  small and large updates: per-push seconds = overhead + bytes / bandwidth; and
  a round's own cost (open, hand-out to the pool, close, pull) from rounds of 4 tiny pushes;
* serverful: Flower's ``aggregate`` over a batch of this model's updates.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..layout import Layout

log = logging.getLogger("lifl.sim.calibrate")
_VERSION = 5


@dataclass(frozen=True)
class Costs:
    push_overhead_s: float     # gateway seconds per push, whatever its size
    ingest_Bps: float          # gateway bytes/s beyond that
    update_s: float            # fold one update alone
    fuse_speedup: float        # per-update speed-up of a fused batch of 16 (FoldCosts.fuse_speedup)
    partial_s: float           # fold one float64 partial
    finalize_s: float
    cold_start_s: float
    flower_per_update_s: float | None  # Flower aggregate(), per update of this model (None: flwr absent)
    gateway_cpu_push_s: float = 0.0      # gateway CPU-seconds per push, whatever its size
    gateway_cpu_per_byte: float = 0.0    # and per byte beyond that
    round_overhead_s: float = 0.0        # open + hand-out + close + pull of a round, beyond its pushes

    def push_s(self, nbytes: int) -> float:
        return self.push_overhead_s + nbytes / self.ingest_Bps

    def push_cpu_s(self, nbytes: int) -> float:
        return self.gateway_cpu_push_s + nbytes * self.gateway_cpu_per_byte


def _median_time(fn, repeat: int = 5) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure_fold(specs) -> dict:
    """Fold, partial, finalize and Flower aggregate seconds for this layout."""
    from .. import fold
    from .workload import base_model, client_update
    base = base_model(specs, 0)
    layout = Layout.from_arrays(base)
    ups = [client_update(base, 0, 0, i) for i in range(4)]
    bufs = []
    for u in ups:
        b = bytearray(layout.total_size)
        layout.pack_into(u, b)
        bufs.append(b)
    views = [fold.UpdateViews(layout, b) for b in bufs]
    acc = np.zeros(layout.numel, np.float64)
    one = _median_time(lambda: fold.fold_updates(acc, layout, views[:1], [1.0]))
    batch = [views[i % 4] for i in range(16)]
    sixteen = _median_time(lambda: fold.fold_updates(acc, layout, batch, [1.0] * 16), 3)
    # batch_seconds(t, k, F) = t((1 - 1/F) + k/F)  =>  F = (k - 1) / (T_k / t - 1)
    ratio = sixteen / one
    fuse = max(1.0, 15.0 / max(ratio - 1.0, 1e-9)) if ratio < 16 else 1.0
    part = np.ones(layout.numel, np.float64)
    partial = _median_time(lambda: fold.fold_partials(acc, [part]))
    out = bytearray(layout.total_size)
    fin = _median_time(lambda: fold.finalize(np.abs(acc) + 1.0, layout, 3.0, out), 3)
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError:  # the serverful baseline needs the flower extra
        flower = None
    else:
        res = [([u[k] for k in u], 10 + i) for i, u in enumerate(ups * 2)]
        flower = _median_time(lambda: aggregate(res), 3) / len(res)
    return {"update_s": one, "fuse_speedup": min(fuse, 16.0), "partial_s": partial, "finalize_s": fin,
            "flower_per_update_s": flower}


def measure_cold_start(n: int = 3) -> float:
    from ..runtime.local import LocalRuntime
    times = []
    with LocalRuntime(arena=None) as rt:   # only starts functions: no segments
        rt.prepare()
        for _ in range(n):
            w = rt.start_worker(lambda *_: None)
            times.append(w.start_seconds)
            rt.stop_worker(w)
    return statistics.median(times)


def _line(p0: tuple[float, float], p1: tuple[float, float]) -> tuple[float, float]:
    """(intercept, slope) through two points, both kept >= 0."""
    (x0, y0), (x1, y1) = p0, p1
    slope = max((y1 - y0) / (x1 - x0), 0.0)
    return max(y0 - slope * x0, 0.0), slope


def _calibration_run(model: str, clients: int, rounds: int, processes: int, threads: int):
    """A real run of ``clients`` pushes per round at full speed (no exactness check)."""
    from .config import RunSpec, SimConfig, Workload
    from .real import run_real
    from .traces import generate
    cfg = SimConfig(Workload(rounds=rounds, clients_per_round=clients, model=model),
                    run=RunSpec(mode="real", processes=processes, threads=threads, check_exact=False,
                                progress=False), server={"metrics_port": -1}).validate()
    return run_real(cfg, generate(cfg.trace, clients), "calibration",
                    {"metrics_port": -1, "shm_prefix": f"liflcal{os.getpid()}"})


def measure_ingest(processes: int, threads: int, pushes: int = 400) -> dict:
    """Per-push wall and gateway CPU seconds (overhead + per byte) from two real runs: many tiny
    pushes, then fewer large ones, from the real client pool at full speed; then a round's own
    cost from rounds of 4 tiny pushes (what is left beyond the pushes)."""
    points = []
    for model, n in (("dense:256", pushes), ("dense:2000000", max(4, pushes // 8))):
        rec = _calibration_run(model, n, 3, processes, threads)  # the median round: this machine is shared
        r = sorted(rec.rounds, key=lambda r: r.push_phase_s)[1]
        pushes_in_run = max(1, sum(x.reported for x in rec.rounds))
        points.append((rec.update_bytes, r.push_phase_s / max(1, r.reported), rec.cpu["gateway"] / pushes_in_run))
    overhead, per_byte = _line(points[0][:2], points[1][:2])
    cpu0, cpu_byte = _line((points[0][0], points[0][2]), (points[1][0], points[1][2]))
    rec = _calibration_run("dense:256", 4, 3, processes, threads)
    tiny = [r.round_s - 4 * (overhead + points[0][0] * per_byte) for r in rec.rounds]
    return {"push_overhead_s": max(overhead, 1e-6), "ingest_Bps": 1.0 / max(per_byte, 1e-12),
            "gateway_cpu_push_s": cpu0, "gateway_cpu_per_byte": cpu_byte,
            "round_overhead_s": max(0.0, statistics.median(tiny))}


def _cache_dir(where: str) -> Path:
    return Path(where or os.environ.get("LIFL_SIM_CACHE") or Path.home() / ".cache" / "lifl" / "sim")


def _key(*parts) -> str:
    text = json.dumps([_VERSION, os.cpu_count(), sys.version.split()[0], *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def costs_for(specs, processes: int, threads: int, cache: str = "", pushes: int = 400) -> tuple[Costs, dict]:
    """Measured costs for this model and client pool; returns (costs, where each came from)."""
    d = _cache_dir(cache)
    d.mkdir(parents=True, exist_ok=True)
    src = {}
    numel = sum(int(np.prod(s, dtype=np.int64)) for _, s, _ in specs)
    f_path = d / f"fold-{_key('fold', [[n, list(s), t] for n, s, t in specs])}.json"
    m_path = d / f"machine-{_key('machine', processes, threads, pushes)}.json"
    if f_path.exists():
        fold_c = json.loads(f_path.read_text())
        src["fold"] = f"cache {f_path}"
    else:
        log.info("measuring fold costs for %d elements", numel)
        fold_c = measure_fold(specs)
        f_path.write_text(json.dumps(fold_c))
        src["fold"] = "measured now"
    if m_path.exists():
        mach = json.loads(m_path.read_text())
        src["ingest"] = src["cold_start"] = f"cache {m_path}"
    else:
        log.info("measuring cold start and ingest (two small real runs)")
        mach = {**measure_ingest(processes, threads, pushes), "cold_start_s": measure_cold_start()}
        m_path.write_text(json.dumps(mach))
        src["ingest"] = src["cold_start"] = "measured now"
    costs = Costs(mach["push_overhead_s"], mach["ingest_Bps"], fold_c["update_s"], fold_c["fuse_speedup"],
                  fold_c["partial_s"], fold_c["finalize_s"], mach["cold_start_s"], fold_c["flower_per_update_s"],
                  mach["gateway_cpu_push_s"], mach["gateway_cpu_per_byte"], mach["round_overhead_s"])
    return costs, {"costs": asdict(costs), "source": src}
