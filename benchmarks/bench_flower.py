"""Flower + LIFL vs stock Flower FedAvg, deployment mode on loopback.

    .venv/bin/python -m benchmarks.bench_flower --nodes 10,30 --layouts 1m,resnet18 --reps 5

For each N: one LIFL server, one real ``flower-superlink --insecure`` and N real
``flower-supernode --insecure`` processes stay up; ``flwr run`` runs of the example
app (``examples/flower-app``, model ``synthetic-<layout>``: clients send fixed random
arrays of the layout's real shapes instead of training) alternate between the
variants (A B C A B C ...):

* ``stock``     — ``flwr.serverapp.strategy.FedAvg``; updates go through the SuperLink.
* ``lifl``      — LiflStrategy(FedAvg) + lifl_mod; updates go to LIFL, the model still
                  reaches clients through the SuperLink.
* ``lifl-pull`` — as ``lifl`` and clients pull the model from LIFL (train messages carry none).

Measured per run over rounds 2..R (round 1 includes app installation and ClientApp
start-up and is skipped): median round wall time (the ServerApp's own clock between
rounds), server-side CPU-seconds per round and server-side peak memory. Server side =
the SuperLink process tree (SuperLink, SuperExec, ServerApp) for every variant, plus
the LIFL server process tree (gateway + aggregator functions) for the LIFL variants.
Memory is the summed PSS (/proc/PID/smaps_rollup), so shared memory is counted once.
Ratios are LIFL-variant median ÷ stock median; raw medians are printed beside them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lifl.flower.testing import Stack, TreeSampler

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-app"
LAYOUTS = {"1m": "synthetic-1m", "resnet18": "synthetic-resnet18"}
MiB = 2**20


def one_run(stack: Stack, variant: str, layout: str, n: int, rounds: int, out: Path, timeout: float) -> dict:
    rc = {"num-server-rounds": rounds, "min-nodes": n, "model": LAYOUTS[layout], "out": str(out),
          "lifl": variant != "stock", "lifl-pull": variant == "lifl-pull", "lifl-address": stack.lifl_address,
          "lifl-job": f"bench-{variant}", "fraction-evaluate": 0.0, "round-timeout": timeout}
    roots = [stack.superlink.pid] + ([stack.lifl.pid] if variant != "stock" else [])
    sampler = TreeSampler(roots, interval=0.1).start()
    try:
        r = stack.flwr_run(APP, rc, timeout=timeout)
    finally:
        sampler.stop()
    if r.returncode != 0 or not out.with_suffix(".json").exists():
        raise RuntimeError(f"{variant} run failed:\n{r.stdout[-3000:]}")
    summary = json.loads(out.with_suffix(".json").read_text())
    marks = [t for _, t in summary["round_marks"]]         # before round 1, after round 1, ...
    t0, t1 = marks[1], marks[-1]                             # rounds 2..R
    w = sampler.window(t0, t1)
    measured = rounds - 1
    return {"round_s": statistics.median(summary["round_seconds"][1:]),
            "cpu_s_per_round": w["cpu_s"] / measured,
            "peak_mib": w["peak_pss"] / MiB,
            "growth_mib": (w["peak_pss"] - sampler.samples[0][2]) / MiB,   # over the idle servers before the run
            "samples": w["samples"], "detail": summary.get("last_round_detail", "")}


class _Servers:
    """LIFL + SuperLink + N SuperNodes; with ``fresh`` a new set per run (no heap carried over between runs)."""

    def __init__(self, n: int, lifl_cfg: dict, fresh: bool, tmp: Path, log):
        self.n, self.lifl_cfg, self.fresh, self.tmp, self.log = n, lifl_cfg, fresh, tmp, log
        self.stack: Stack | None = None
        self.count = 0

    def get(self) -> Stack:
        if self.stack is None or self.fresh:
            self.close()
            self.count += 1
            st = Stack(self.tmp / f"stack-{self.count}")
            st.start_lifl(**self.lifl_cfg)
            st.start_superlink()
            st.start_supernodes(self.n)
            self.stack = st
            if self.count == 1 or not self.fresh:
                self.log(f"N={self.n}: LIFL at {st.lifl_address}, SuperLink on {st.superlink_port}, "
                         f"{self.n} SuperNodes up" + (" (fresh set per run)" if self.fresh else ""))
        return self.stack

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None


def bench(nodes: list[int], layouts: list[str], variants: list[str], reps: int, rounds: int,
          timeout: float, lifl_cfg: dict, fresh: bool = False, log=print) -> dict:
    results: dict = {"config": {"nodes": nodes, "layouts": layouts, "variants": variants, "reps": reps,
                                "rounds": rounds, "lifl_server": lifl_cfg, "fresh_stack_per_run": fresh},
                     "cells": []}
    for n in nodes:
        with tempfile.TemporaryDirectory(prefix=f"bench-flower-{n}-") as tmp:
            servers = _Servers(n, lifl_cfg, fresh, Path(tmp), log)
            try:
                for layout in layouts:
                    runs: dict[str, list[dict]] = {v: [] for v in variants}
                    for rep in range(reps):
                        order = variants if rep % 2 == 0 else list(reversed(variants))
                        for v in order:
                            t = time.time()
                            res = one_run(servers.get(), v, layout, n, rounds, Path(tmp) / f"{layout}-{v}-{rep}",
                                          timeout)
                            runs[v].append(res)
                            log(f"  N={n} {layout:8s} {v:9s} rep {rep}: round {res['round_s']:.2f}s "
                                f"cpu {res['cpu_s_per_round']:.2f}s/round peak {res['peak_mib']:.0f} MiB "
                                f"(+{res['growth_mib']:.0f}) ({time.time() - t:.0f}s wall)")
                    med = {v: {k: statistics.median(r[k] for r in runs[v])
                               for k in ("round_s", "cpu_s_per_round", "peak_mib", "growth_mib")} for v in variants}
                    ratios = {v: {k: med[v][k] / med["stock"][k] for k in med[v]} for v in variants if v != "stock"}
                    results["cells"].append({"nodes": n, "layout": layout, "medians": med, "ratios": ratios,
                                             "runs": runs})
            finally:
                servers.close()
    return results


def table(results: dict) -> str:
    lines = [f"{'N':>3} {'layout':8} {'variant':9} | {'round':>6} {'cpu':>6} {'mem':>6} {'growth':>6} | "
             f"{'round s':>8} {'cpu s/rnd':>9} {'peak MiB':>9} {'growth MiB':>10}",
             "                             (ratios vs stock FedAvg)      (raw medians)"]
    for c in results["cells"]:
        for v, m in c["medians"].items():
            r = c["ratios"].get(v)
            rr = (f"{r['round_s']:6.2f} {r['cpu_s_per_round']:6.2f} {r['peak_mib']:6.2f} {r['growth_mib']:6.2f}"
                  if r else f"{'1':>6} {'1':>6} {'1':>6} {'1':>6}")
            lines.append(f"{c['nodes']:>3} {c['layout']:8} {v:9} | {rr} | {m['round_s']:8.2f} "
                         f"{m['cpu_s_per_round']:9.2f} {m['peak_mib']:9.0f} {m['growth_mib']:10.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="10,30", help="comma-separated SuperNode counts")
    ap.add_argument("--layouts", default="1m,resnet18", help="comma-separated: 1m, resnet18")
    ap.add_argument("--variants", default="stock,lifl,lifl-pull")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per variant")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 is not measured)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per flwr run")
    ap.add_argument("--lifl-leaves", type=int, default=1)
    ap.add_argument("--lifl-workers", type=int, default=2)
    ap.add_argument("--lifl-shm-mb", type=int, default=512)
    ap.add_argument("--fresh-stack", action="store_true",
                    help="new LIFL + SuperLink + SuperNodes for every run (memory not carried over between runs)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "flower.json"))
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    if variants[0] != "stock":
        variants = ["stock"] + [v for v in variants if v != "stock"]
    if a.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is not measured)")
    lifl_cfg = {"leaves": a.lifl_leaves, "workers": a.lifl_workers, "shm_budget_mb": a.lifl_shm_mb}
    res = bench([int(x) for x in a.nodes.split(",")], a.layouts.split(","), variants, a.reps, a.rounds,
                a.timeout, lifl_cfg, fresh=a.fresh_stack, log=lambda s: print(s, flush=True))
    print()
    print(table(res))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
