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
Memory is the summed PSS (/proc/PID/smaps_rollup), so shared memory is counted once,
split per role (SuperLink, SuperExec, ServerApp, LIFL gateway, LIFL functions) at the
moment of the total peak; LIFL's /dev/shm segments are sampled as a cross-check.
Ratios are LIFL-variant median ÷ stock median; raw medians are printed beside them.

For memory use ``--fresh-stack`` (a new SuperLink, SuperNodes and LIFL server per run):
long-lived servers carry the heap grown in earlier runs into later ones. The LIFL server
runs with a slot budget of two updates of the layout, ``keep_rounds=1``,
``grpc_bdp_probe=false`` and ``MALLOC_ARENA_MAX=2`` unless told otherwise (see docs/flower.md for the trade-offs).
``--combine A.json B.json ...`` pools the runs of several result files into one table.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.flower_stack import Stack, flower_role
from benchmarks.procsampler import ProcSampler

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-app"
LAYOUTS = {"1m": "synthetic-1m", "resnet18": "synthetic-resnet18"}
MiB = 2**20


def model_bytes(layout: str) -> int:
    """Bytes of one float32 update of the layout (the example app's synthetic shapes)."""
    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))
    from lifl_flower_example.task import synthetic_shapes      # numpy only

    return sum(4 * math.prod(shape) for shape in synthetic_shapes(LAYOUTS[layout]).values())


def auto_shm_mb(layout: str) -> int:
    """LIFL slot budget for the bench: two updates in flight (one received while another is folded), +2 MiB."""
    return math.ceil(2 * model_bytes(layout) / MiB) + 2


ROLES = ("superlink", "superexec", "serverapp", "lifl-gateway", "lifl-functions")


def one_run(stack: Stack, variant: str, layout: str, n: int, rounds: int, out: Path, timeout: float) -> dict:
    rc = {"num-server-rounds": rounds, "min-nodes": n, "model": LAYOUTS[layout], "out": str(out),
          "lifl": variant != "stock", "lifl-pull": variant == "lifl-pull", "lifl-address": stack.lifl_address,
          "lifl-job": f"bench-{variant}", "fraction-evaluate": 0.0, "round-timeout": timeout}
    labels = {stack.superlink.pid: "superlink"}
    if variant != "stock":
        labels[stack.lifl.pid] = "lifl-gateway"
    shm_prefix = f"{stack.lifl_shm_prefix}-{stack.lifl.pid}-" if variant != "stock" else None
    # every tick a full sample, the tree rescanned each time: SuperExec starts a ServerApp per run
    sampler = ProcSampler(list(labels), interval=0.1, every=1, rescan_s=0.0, labels=labels, role=flower_role,
                          shm_prefix=shm_prefix).start()
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
            "growth_mib": (w["peak_pss"] - sampler.samples[0].pss) / MiB,   # over the idle servers before the run
            "idle_mib": sampler.samples[0].pss / MiB,
            "idle_roles_mib": {k: v / MiB for k, v in sampler.samples[0].roles.items()},
            "at_peak_mib": {k: v / MiB for k, v in w.get("at_peak", {}).items()},
            "role_peak_mib": {k: v / MiB for k, v in w.get("role_peak", {}).items()},
            "role_cpu_s_per_round": {k: v / measured for k, v in w.get("role_cpu_s", {}).items()},
            "shm_files_at_peak_mib": w.get("shm_at_peak", 0) / MiB, "shm_files_peak_mib": w.get("shm_peak", 0) / MiB,
            "samples": w["samples"], "detail": summary.get("last_round_detail", "")}


def roles_line(d: dict) -> str:
    """'superlink 120 + serverapp 300 + ...' in a fixed order, MiB."""
    keys = [k for k in ROLES if k in d] + sorted(k for k in d if k not in ROLES)
    return " + ".join(f"{k} {d[k]:.0f}" if d[k] >= 10 or d[k] == 0 else f"{k} {d[k]:.1f}" for k in keys)


class _Servers:
    """LIFL + SuperLink + N SuperNodes; with ``fresh`` a new set per run (no heap carried over between runs)."""

    def __init__(self, n: int, lifl_cfg: dict, fresh: bool, tmp: Path, log):
        self.n, self.lifl_cfg, self.fresh, self.tmp, self.log = n, lifl_cfg, fresh, tmp, log
        self.stack: Stack | None = None
        self.count = 0
        self.cfg: dict = {}

    def get(self, layout: str) -> Stack:
        cfg = dict(self.lifl_cfg)
        if not cfg.get("shm_budget_mb"):
            cfg["shm_budget_mb"] = auto_shm_mb(layout)
        if self.stack is None or self.fresh or cfg != self.cfg:
            self.close()
            self.count += 1
            self.cfg = cfg
            st = Stack(self.tmp / f"stack-{self.count}")
            st.start_lifl(**cfg)
            st.start_superlink()
            st.start_supernodes(self.n)
            self.stack = st
            if self.count == 1 or not self.fresh:
                self.log(f"N={self.n}: LIFL at {st.lifl_address} ({cfg}), SuperLink on {st.superlink_port}, "
                         f"{self.n} SuperNodes up" + (" (fresh set per run)" if self.fresh else ""))
        return self.stack

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None


def bench(nodes: list[int], layouts: list[str], variants: list[str], reps: int, rounds: int,
          timeout: float, lifl_cfg: dict, fresh: bool = False, log=print, json_path: str | None = None) -> dict:
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
                            res = one_run(servers.get(layout), v, layout, n, rounds, Path(tmp) / f"{layout}-{v}-{rep}",
                                          timeout)
                            runs[v].append(res)
                            log(f"  N={n} {layout:8s} {v:9s} rep {rep}: round {res['round_s']:.2f}s "
                                f"cpu {res['cpu_s_per_round']:.2f}s/round peak {res['peak_mib']:.0f} MiB "
                                f"(+{res['growth_mib']:.0f}) ({time.time() - t:.0f}s wall)\n"
                                f"      at peak: {roles_line(res['at_peak_mib'])} MiB"
                                + (f"; LIFL shm files {res['shm_files_at_peak_mib']:.0f} MiB "
                                   f"(max {res['shm_files_peak_mib']:.0f})" if v != "stock" else "") +
                                f"\n      own peaks: {roles_line(res['role_peak_mib'])} MiB"
                                f"\n      idle before: {roles_line(res['idle_roles_mib'])} MiB"
                                f"\n      cpu s/round: {roles_line(res['role_cpu_s_per_round'])}")
                            if json_path:
                                Path(json_path).write_text(json.dumps(results | {"partial": {
                                    "nodes": n, "layout": layout, "runs": runs}}, indent=1))
                    results["cells"].append(cell(n, layout, runs))
            finally:
                servers.close()
    return results


def cell(n: int, layout: str, runs: dict[str, list[dict]]) -> dict:
    """Medians over the runs of each variant, ratios to stock's medians, per-role split of the peak."""
    runs = {v: rs for v, rs in runs.items() if rs}
    variants = sorted(runs, key=lambda v: (v != "stock", v))
    med = {v: {k: statistics.median(r[k] for r in runs[v])
               for k in ("round_s", "cpu_s_per_round", "peak_mib", "growth_mib")} for v in variants}
    for v in variants:        # per-role split of the peak: medians over the runs
        roles = sorted({k for r in runs[v] for k in r.get("at_peak_mib", {})})
        med[v]["at_peak_mib"] = {k: statistics.median(r["at_peak_mib"].get(k, 0.0) for r in runs[v]) for k in roles}
        med[v]["runs"] = len(runs[v])
    ratios = {v: {k: med[v][k] / med["stock"][k] for k in med[v] if k not in ("at_peak_mib", "runs")}
              for v in variants if v != "stock"} if "stock" in med else {}
    return {"nodes": n, "layout": layout, "medians": med, "ratios": ratios, "runs": runs}


def combine(paths: list[str]) -> dict:
    """Pool the runs of several result files (finished cells and an interrupted bench's partial cell)."""
    pooled: dict[tuple[int, str], dict[str, list[dict]]] = {}
    configs = []
    for path in paths:
        d = json.loads(Path(path).read_text())
        configs.append({"file": path, **d.get("config", {})})
        cells = list(d.get("cells", [])) + ([d["partial"]] if "partial" in d else [])
        for c in cells:
            into = pooled.setdefault((c["nodes"], c["layout"]), {})
            for v, rs in c["runs"].items():
                into.setdefault(v, []).extend(rs)
    return {"config": {"combined": configs}, "cells": [cell(n, lay, runs) for (n, lay), runs in sorted(pooled.items())]}


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
                         f"{m['cpu_s_per_round']:9.2f} {m['peak_mib']:9.0f} {m['growth_mib']:10.0f}"
                         f"  ({m.get('runs', '?')} runs)")
            if m.get("at_peak_mib"):
                lines.append(f"{'':22}   peak split (MiB, medians): {roles_line(m['at_peak_mib'])}")
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
    ap.add_argument("--lifl-shm-mb", type=int, default=0,
                    help="LIFL update-slot budget in MiB; 0 (default) = two updates of the layout (one being "
                         "received while another is folded)")
    ap.add_argument("--lifl-keep-rounds", type=int, default=1,
                    help="finished rounds whose result and initial model LIFL keeps for Pull")
    ap.add_argument("--lifl-malloc-arena-max", type=int, default=2,
                    help="MALLOC_ARENA_MAX of the LIFL server process (0 = glibc's default of 8 per core)")
    ap.add_argument("--lifl-bdp-probe", action="store_true",
                    help="leave gRPC's BDP window probing on in LIFL (off by default here: a push waiting for "
                         "a slot then buffers 64 KiB, not megabytes)")
    ap.add_argument("--lifl-shm-prefix", default="liflbench",
                    help="name prefix of LIFL's /dev/shm segments (kept apart from other LIFL servers on the host)")
    ap.add_argument("--fresh-stack", action="store_true",
                    help="new LIFL + SuperLink + SuperNodes for every run (memory not carried over between runs)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "flower.json"))
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="run nothing: pool the runs of these result files and print the table")
    a = ap.parse_args(argv)
    if a.combine:
        res = combine(a.combine)
        print(table(res))
        if a.json != ap.get_default("json"):
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0

    def _stop(*_):                 # SIGTERM (e.g. from a job runner) stops like Ctrl-C: every stack is torn down
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)    # also when started in the background
    variants = a.variants.split(",")
    if "stock" in variants and variants[0] != "stock":
        variants = ["stock"] + [v for v in variants if v != "stock"]
    if a.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is not measured)")
    lifl_cfg = {"leaves": a.lifl_leaves, "workers": a.lifl_workers, "shm_budget_mb": a.lifl_shm_mb,
                "keep_rounds": a.lifl_keep_rounds, "shm_prefix": a.lifl_shm_prefix,
                "malloc_arena_max": a.lifl_malloc_arena_max, "grpc_bdp_probe": a.lifl_bdp_probe}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    res = bench([int(x) for x in a.nodes.split(",")], a.layouts.split(","), variants, a.reps, a.rounds,
                a.timeout, lifl_cfg, fresh=a.fresh_stack, log=lambda s: print(s, flush=True), json_path=a.json)
    print()
    print(table(res))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
