"""lifl sim's goal figures, each with the command that reproduces it.

    python -m benchmarks.bench_sim scale      # real mode: 1k, 3k, 10k clients x 100 k params, server memory
    python -m benchmarks.bench_sim virtual    # virtual time: 100k clients x ResNet-18 x 10 rounds, diurnal trace
    python -m benchmarks.bench_sim validate   # virtual against real round time at sizes both can run
    python -m benchmarks.bench_sim baseline   # LIFL against the serverful Flower baseline, interleaved, median of 5
    python -m benchmarks.bench_sim ablations  # every variant in both modes on one trace (ratios to full LIFL)

Each prints a table, writes JSON under benchmarks/results/sim-*.json and keeps
the full run records (report.md and plots) under bench-out/sim-*/. Ratios are
against a peer measured in the same run (serverful baseline, or the smallest size).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from lifl.sim import config, report, runner

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "bench-out"


def _run(overrides: dict, out: str):
    cfg = config.load(None, {"run.progress": False, **overrides})
    t = time.monotonic()
    rec = runner.run(cfg)
    wall = time.monotonic() - t
    report.write(rec, OUT / out)
    return rec, wall


def _save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data["machine"] = runner.RunRecord(config={}).machine
    (RESULTS / f"sim-{name}.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {RESULTS / f'sim-{name}.json'}")


def scale(a) -> None:
    """One run over every size (the report's scaling plot); the server is started fresh per size."""
    t = time.monotonic()
    rec, wall = _run({"run.mode": "real", "run.sizes": list(a.sizes), "workload.model": a.model,
                      "run.processes": a.processes, "run.threads": a.threads}, "sim-scale")
    rows = []
    for v in rec.variants:
        r = v.rounds[0]
        rows.append({"clients": r.selected, "round_s": r.round_s, "variant_wall_s": v.wall_s,
                     "post_arrival_s": r.post_arrival_s, "server_peak_pss_mib": v.peak_pss_bytes / 2**20,
                     "cpu": v.cpu, "max_rel_error": r.max_rel_error})
    base = rows[0]["server_peak_pss_mib"]
    print(f"{'clients':>8} {'round s':>8} {'size wall s':>11} {'server PSS MiB':>15} {'PSS / smallest':>15} "
          f"{'gateway CPU-s':>13} {'fn CPU-s':>9} {'client CPU-s':>12} {'max rel err':>11}")
    for r in rows:
        print(f"{r['clients']:8} {r['round_s']:8.2f} {r['variant_wall_s']:11.2f} {r['server_peak_pss_mib']:15.1f} "
              f"{r['server_peak_pss_mib'] / base:15.2f} {r['cpu']['gateway']:13.2f} {r['cpu']['functions']:9.2f} "
              f"{r['cpu']['clients']:12.2f} {r['max_rel_error']:11.2e}")
    print(f"whole command {time.monotonic() - t:.1f} s (all sizes, incl. server and pool start-ups)")
    _save("scale", {"command": "python -m benchmarks.bench_sim " + " ".join(sys.argv[1:]), "model": a.model,
                    "rows": rows, "wall_s": wall})


def virtual(a) -> None:
    rec, wall = _run({"run.mode": "virtual", "workload.clients_per_round": a.clients,
                      "workload.population": int(a.clients * 2.5), "workload.rounds": a.rounds,
                      "workload.model": a.model, "trace.kind": "diurnal", "trace.window_s": 600.0,
                      "run.tick_s": a.tick, "run.variants": "lifl,serverful"}, "sim-virtual")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    v, sf = rec.variants
    print(f"{a.clients} clients/round x {a.model} x {a.rounds} rounds (diurnal, population {int(a.clients * 2.5)}): "
          f"{wall:.1f} s wall (goal < 300), peak RSS {rss / 2**30:.2f} GiB (goal < 2), "
          f"virtual round time median {statistics.median(r.round_s for r in v.rounds):.0f} s")
    post = [statistics.median(r.post_arrival_s for r in x.rounds) for x in (v, sf)]
    print(f"against the serverful baseline (same trace, virtual): platform CPU-s {v.cpu_total / sf.cpu_total:.3f}, "
          f"post-arrival {post[0] / post[1]:.4f} ({post[0]:.3f} s vs {post[1]:.0f} s), modelled memory "
          f"{v.peak_pss_bytes / sf.peak_pss_bytes:.2e} ({v.peak_pss_bytes / 2**20:.0f} MiB vs "
          f"{sf.peak_pss_bytes / 2**30:.0f} GiB)")
    _save("virtual", {"command": "python -m benchmarks.bench_sim virtual", "wall_s": wall, "peak_rss_bytes": rss,
                      "rounds": [vars(r) for r in v.rounds], "serverful_rounds": [vars(r) for r in sf.rounds],
                      "cpu": {"lifl": v.cpu, "serverful": sf.cpu},
                      "memory_bytes": {"lifl": v.peak_pss_bytes, "serverful": sf.peak_pss_bytes},
                      "calibration": rec.calibration})


def validate(a) -> None:
    """Calibrated afresh for each size, just before its runs (a new cache each), so that both modes
    see this shared machine in about the same state; its load average is printed beside each size."""
    import os
    import tempfile
    rows = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory(prefix="lifl-sim-cal-") as cache:
            for kind in ("all_at_once", "uniform"):
                load0 = os.getloadavg()[0]
                rec, _ = _run({"run.mode": "both", "workload.clients_per_round": n, "workload.model": "mlp100k",
                               "workload.rounds": a.rounds, "trace.kind": kind, "trace.window_s": 5.0,
                               "run.processes": a.processes, "run.threads": a.threads,
                               "run.calibration_cache": cache}, f"sim-validate-{kind}-{n}")
                load = (load0, os.getloadavg()[0])
                rows.extend({"trace": kind, "load_avg": load, **x} for x in rec.validation)
    print(f"{'trace':12} {'clients':>8} {'round':>5} {'real s':>8} {'virtual s':>9} {'error %':>8}")
    for r in rows:
        print(f"{r['trace']:12} {r['clients']:8} {r['round']:5} {r['real_s']:8.3f} {r['virtual_s']:9.3f} "
              f"{100 * r['error']:+8.1f}")
    errs = [abs(r["error"]) for r in rows]
    print(f"per round: median |error| {100 * statistics.median(errs):.1f} %, worst {100 * max(errs):.1f} %")
    summary = []
    print(f"{'trace':12} {'clients':>8} {'real s (median)':>16} {'virtual s (median)':>19} {'error %':>8} "
          f"{'load avg (2 cores)':>18}")
    for kind in ("all_at_once", "uniform"):
        for n in a.sizes:
            sel = [r for r in rows if r["trace"] == kind and r["clients"] == n]  # no dropout here
            re_, vi = statistics.median(r["real_s"] for r in sel), statistics.median(r["virtual_s"] for r in sel)
            load = sel[0]["load_avg"]
            summary.append({"trace": kind, "clients": n, "real_s": re_, "virtual_s": vi, "error": vi / re_ - 1,
                            "load_avg": load})
            print(f"{kind:12} {n:8} {re_:16.3f} {vi:19.3f} {100 * (vi / re_ - 1):+8.1f} "
                  f"{load[0]:8.1f} -> {load[1]:5.1f}")
    _save("validate", {"command": "python -m benchmarks.bench_sim validate", "rows": rows, "summary": summary})


def baseline(a) -> None:
    """LIFL and the serverful baseline in real mode, interleaved A B A B, median of the repetitions."""
    rows = []
    for n in a.sizes:
        got: dict[str, list] = {"lifl": [], "serverful": []}
        for rep in range(a.reps):
            for variant in ("lifl", "serverful"):
                rec, _ = _run({"run.mode": "real", "run.variants": variant, "workload.clients_per_round": n,
                               "workload.model": a.model, "workload.seed": rep, "run.processes": a.processes,
                               "run.threads": a.threads}, f"sim-baseline-{variant}-{n}")
                v = rec.variants[0]
                got[variant].append({"cpu": v.cpu_total, "post": v.rounds[0].post_arrival_s,
                                     "round": v.rounds[0].round_s, "pss": v.peak_pss_bytes})
            print(f"  .. {n} clients: rep {rep + 1}/{a.reps}", file=sys.stderr, flush=True)
        med = {k: {m: statistics.median(x[m] for x in xs) for m in ("cpu", "post", "round", "pss")}
               for k, xs in got.items()}
        ratio = {m: statistics.median(l[m] / s[m] for l, s in zip(got["lifl"], got["serverful"]))
                 for m in ("cpu", "post", "round", "pss")}
        rows.append({"clients": n, "median": med, "ratio_lifl_over_serverful": ratio, "raw": got})
    print(f"{'clients':>8} {'metric':>22} {'lifl':>10} {'serverful':>10} {'lifl/serverful':>15}")
    names = {"cpu": "platform CPU-s", "post": "post-arrival s", "round": "round s", "pss": "server peak PSS MiB"}
    for r in rows:
        for m, label in names.items():
            scale_ = 2**20 if m == "pss" else 1
            print(f"{r['clients']:8} {label:>22} {r['median']['lifl'][m] / scale_:10.3f} "
                  f"{r['median']['serverful'][m] / scale_:10.3f} {r['ratio_lifl_over_serverful'][m]:15.3f}")
    _save("baseline", {"command": "python -m benchmarks.bench_sim baseline", "model": a.model, "rows": rows})


def ablations(a) -> None:
    """Every variant on one trace with gaps between rounds longer than a tick, in both modes."""
    rec, wall = _run({"run.mode": "both", "run.variants": ",".join(config.VARIANTS),
                      "workload.clients_per_round": a.clients, "workload.rounds": a.rounds,
                      "workload.model": "mlp100k", "trace.kind": "uniform", "trace.window_s": a.window,
                      "run.processes": a.processes, "run.threads": a.threads}, "sim-ablations")
    sums = [report.summary(v) for v in rec.variants]
    base = {s["mode"]: s for s in sums if s["variant"] == "lifl"}
    print(f"{'mode':8} {'variant':14} {'round s':>8} {'post-arrival s':>14} {'platform CPU-s':>14} {'peak MiB':>9} "
          f"{'cold':>5} {'warm':>5} {'MB moved':>9} {'CPU / lifl':>10} {'post / lifl':>11}")
    for s in sums:
        b = base[s["mode"]]
        print(f"{s['mode']:8} {s['variant']:14} {s['round_s']:8.3f} {s['post_arrival_s']:14.4f} "
              f"{s['cpu_platform']:14.2f} {s['peak_mib']:9.1f} {s['cold']:5g} {s['warm']:5g} {s['mb_processes']:9.0f} "
              f"{s['cpu_platform'] / b['cpu_platform']:10.2f} {s['post_arrival_s'] / b['post_arrival_s']:11.2f}")
    print(f"{wall:.0f} s; report in bench-out/sim-ablations/report.md")
    _save("ablations", {"command": "python -m benchmarks.bench_sim ablations", "rows": sums,
                        "validation": rec.validation})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    s.add_argument("--model", default="mlp100k", help="mlp1m: the 16-core goal")
    v = sub.add_parser("virtual")
    v.add_argument("--clients", type=int, default=100_000)
    v.add_argument("--rounds", type=int, default=10)
    v.add_argument("--model", default="resnet18")
    v.add_argument("--tick", type=float, default=1.0, help="virtual tick (s); 0.05 is the dispatcher's")
    va = sub.add_parser("validate")
    va.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    va.add_argument("--rounds", type=int, default=5)
    b = sub.add_parser("baseline")
    b.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--model", default="mlp100k")
    ab = sub.add_parser("ablations")
    ab.add_argument("--clients", type=int, default=500)
    ab.add_argument("--rounds", type=int, default=3)
    ab.add_argument("--window", type=float, default=2.0)
    for sp in (s, va, b, ab):
        sp.add_argument("--processes", type=int, default=2)
        sp.add_argument("--threads", type=int, default=4)
    a = p.parse_args(argv)
    {"scale": scale, "virtual": virtual, "validate": validate, "baseline": baseline,
     "ablations": ablations}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
