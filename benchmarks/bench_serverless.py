"""Serverless control plane (issue 3): CPU vs an always-on deployment, cold/warm dispatch, elastic vs static plans.

1. **CPU-seconds** of the whole aggregation service (server process, fork server and
   every function, sampled from /proc) over a bursty trace — several rounds, each a
   few bursts of clients separated by idle gaps, with idle time between rounds —
   ÷ the same trace on an always-on deployment: the same number of functions started
   up front and kept running, polling for work every millisecond as a serverful
   aggregator loop does (``min_workers = workers``, ``LIFL_FUNCTION_POLL_S=0.001``).
   Also the CPU burnt per second of the idle gaps between rounds. Goal <= 0.5.
2. **Cold start** (update accepted -> fold sent to a function started for it) and
   **warm dispatch** (the same for a running function), from the server's
   ``lifl_dispatch_seconds`` histogram scraped over HTTP, and the share of dispatches
   that were warm. Goals: cold <= 50 ms, warm <= 1 ms, warm share >= 95 %.
3. **Post-arrival latency** with the elastic planner ÷ the best static hierarchy
   among hand-picked shapes, same updates. Goal <= 1.1.

    python -m benchmarks.bench_serverless [--quick] [--part cpu dispatch latency]
        [--rounds 5] [--clients 200] [--bursts 4] [--burst-gap 0.5] [--round-gap 2.0] [--reps 3]

``--part`` picks what runs (default all): ``cpu`` runs the trace on both deployments,
``dispatch`` reports the elastic runs' dispatch histograms (the trace runs elastic-only
unless ``cpu`` is picked too), ``latency`` runs part 3.
"""
from __future__ import annotations

import os
import threading
import time
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lifl.client import Client
from lifl.layout import Layout

from .common import Report, ServerProc, interleave, median, model_arrays, parser, perturbed
from .procsampler import ProcSampler


def trace(srv: ServerProc, base, pool, rounds: int, clients: int, bursts: int, gap_s: float, round_gap_s: float):
    """Run the bursty trace; return (total CPU-s, CPU-s per idle second between rounds)."""
    layout = Layout.from_arrays(base)
    per_burst = clients // bursts
    idle_cpu, idle_s = 0.0, 0.0
    # CPU only, the tree rescanned every tick: a function that forks, folds and exits between two
    # scans would take its CPU-seconds with it
    with ProcSampler(srv.pid, interval=0.02, every=1, pss=False, rescan_s=0.0) as cpu, \
            Client(srv.address) as c:
        for r in range(rounds):
            rid = c.open_round(layout=layout, expected=per_burst * bursts)
            k = 0
            for b in range(bursts):
                threads = []
                for _ in range(per_burst):
                    threads.append(threading.Thread(target=c.push, args=(rid, pool[k % len(pool)], 1.0, f"c{k}")))
                    k += 1
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if b < bursts - 1:
                    time.sleep(gap_s)
            c.pull(rid, wait_s=60)
            t0, c0 = time.monotonic(), cpu.now().cpu_s
            time.sleep(round_gap_s)
            idle_cpu += cpu.now().cpu_s - c0
            idle_s += time.monotonic() - t0
        total = cpu.now().cpu_s - cpu.samples[0].cpu_s
    return total, idle_cpu / idle_s


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def hist_mean(m: dict, name: str, labels: tuple) -> float:
    n = m.get((f"{name}_count", labels), 0.0)
    return m.get((f"{name}_sum", labels), 0.0) / n if n else float("nan")


def hist_quantile(m: dict, name: str, labels: tuple, q: float = 0.5) -> float:
    """Upper bound of the bucket holding the q-quantile (Prometheus histograms keep only buckets)."""
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                     if k[0] == f"{name}_bucket" and tuple(x for x in k[1] if x[0] != "le") == labels)
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= q * total:
            return le
    return float("nan")


def post_arrival(srv: ServerProc, base, pool, n: int) -> float:
    layout = Layout.from_arrays(base)
    with Client(srv.address) as c:
        rid = c.open_round(layout=layout, expected=n)
        threads = [threading.Thread(target=c.push, args=(rid, pool[i % len(pool)], 1.0 + i, f"c{i}"))
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c.pull(rid, wait_s=60)
        return c.round_info(rid).post_arrival_seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="mlp1m")
    p.add_argument("--rounds", type=int, default=None, help="rounds in the trace (default 5; quick 2)")
    p.add_argument("--clients", type=int, default=None, help="clients per round (default 200; quick 40)")
    p.add_argument("--bursts", type=int, default=4, help="bursts of clients per round")
    p.add_argument("--burst-gap", type=float, default=0.5, metavar="S", help="idle seconds between bursts")
    p.add_argument("--round-gap", type=float, default=None, metavar="S",
                   help="idle seconds after each round (default 2.0; quick 1.0)")
    p.add_argument("--part", nargs="+", choices=("cpu", "dispatch", "latency", "all"), default=["all"],
                   help="what to run (default all)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    quick = args.quick
    parts = {"cpu", "dispatch", "latency"} if "all" in args.part else set(args.part)
    reps = args.reps or (2 if quick else 3)
    rounds = args.rounds or (2 if quick else 5)
    clients = args.clients or (40 if quick else 200)
    bursts, gap_s = args.bursts, args.burst_gap
    round_gap_s = args.round_gap if args.round_gap is not None else (1.0 if quick else 2.0)
    base = model_arrays(args.model)
    pool = [perturbed(base, i) for i in range(8)]
    rep = Report("bench_serverless", "Serverless control plane: elastic LIFL ÷ always-on and ÷ static plans",
                 {"model": Layout.from_arrays(base).describe(), "trace": f"{rounds} rounds x {clients} clients in "
                  f"{bursts} bursts, {gap_s}s gaps, {round_gap_s}s idle between rounds",
                  "parts": " ".join(sorted(parts)), "functions": args.workers, "reps (interleaved)": reps,
                  "quick": quick, "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())})

    elastic = dict(workers=args.workers, leaves=args.workers, metrics_port=0, keep_alive_s=30.0)
    always_on = dict(workers=args.workers, leaves=args.workers, min_workers=args.workers, keep_alive_s=1e9,
                     planner="static")
    metrics = []

    def run_elastic():
        with ServerProc("lifl", **elastic) as srv:
            out = trace(srv, base, pool, rounds, clients, bursts, gap_s, round_gap_s)
            metrics.append(scrape(srv.metrics_port))
            return out

    def run_always_on():
        with ServerProc("lifl", env={"LIFL_FUNCTION_POLL_S": "0.001"}, **always_on) as srv:
            return trace(srv, base, pool, rounds, clients, bursts, gap_s, round_gap_s)

    if "cpu" in parts:
        res = interleave([("elastic", run_elastic), ("always_on", run_always_on)], reps=reps, warmup=0)
        rep.add("bursty trace", "CPU-seconds ÷ always-on", [x[0] for x in res["elastic"]],
                [x[0] for x in res["always_on"]], "CPU-s", goal="<= 0.5", better="lower", threshold=0.5,
                peer_label="always-on")
        rep.raw["idle CPU-s/s"] = {k: [x[1] for x in v] for k, v in res.items()}
        rep.notes.append("idle CPU between rounds (CPU-s per s): elastic "
                         f"{median([x[1] for x in res['elastic']]):.4f}, always-on "
                         f"{median([x[1] for x in res['always_on']]):.4f}")
        rep.notes.append("per rep (CPU-s, idle CPU-s/s): " + "; ".join(
            f"{k} " + ", ".join(f"({t:.2f}, {i:.4f})" for t, i in v) for k, v in res.items()))
    elif "dispatch" in parts:
        interleave([("elastic", run_elastic)], reps=reps, warmup=0)
    if "dispatch" in parts:
        report_dispatch(rep, metrics)
    if "latency" in parts:
        report_latency(rep, base, pool, args.workers, quick)
    rep.notes.append("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    rep.print()
    rep.write(args.out)


def report_dispatch(rep: Report, metrics: list[dict]) -> None:
    cold = [hist_mean(m, "lifl_dispatch_seconds", (("start", "cold"),)) * 1000 for m in metrics]
    warm = [hist_mean(m, "lifl_dispatch_seconds", (("start", "warm"),)) * 1000 for m in metrics]
    n_cold = sum(m.get(("lifl_dispatches_total", (("start", "cold"),)), 0) for m in metrics)
    n_warm = sum(m.get(("lifl_dispatches_total", (("start", "warm"),)), 0) for m in metrics)
    starts = [hist_mean(m, "lifl_cold_start_seconds", ()) * 1000 for m in metrics]
    rep.notes.append(f"cold start (accepted -> fold sent to a new function): mean {median(cold):.2f} ms "
                     f"(goal <= 50); the function's own start {median(starts):.2f} ms")
    warm_p50 = [hist_quantile(m, "lifl_dispatch_seconds", (("start", "warm"),)) * 1000 for m in metrics]
    rep.notes.append(f"warm dispatch (accepted -> fold sent): mean {median(warm):.3f} ms, median <= "
                     f"{median(warm_p50):.3f} ms (histogram bucket bound) (goal <= 1)")
    rep.notes.append(f"dispatches sent at arrival: {int(n_warm)} warm, {int(n_cold)} cold -> warm share "
                     f"{n_warm / max(1, n_warm + n_cold):.1%} (goal >= 95%)")


def report_latency(rep: Report, base, pool, workers: int, quick: bool) -> None:
    n = 20 if quick else 60
    statics = {"static 1 leaf": dict(leaves=1, fan_in=2), "static 2 leaves": dict(leaves=2, fan_in=2)}
    cases = [("elastic", lambda: post_arrival(srv_e, base, pool, n))]
    with ServerProc("lifl", workers=workers, leaves=workers) as srv_e:
        srvs = {k: ServerProc("lifl", workers=workers, planner="static", **v) for k, v in statics.items()}
        try:
            for k, s in srvs.items():
                cases.append((k, lambda s=s: post_arrival(s, base, pool, n)))
            lat = interleave(cases, reps=5 if quick else 7, warmup=1)
            with Client(srv_e.address) as c:
                rep.notes.append(f"elastic plan of the last round: {c.status().hierarchy}")
        finally:
            for s in srvs.values():
                s.close()
    best = min(statics, key=lambda k: median(lat[k]))
    rep.add(f"N={n}", f"post-arrival elastic ÷ best static ({best})", lat["elastic"], lat[best], "ms",
            goal="<= 1.1", better="lower", threshold=1.1, peer_label=best, scale=1000)
    for k in statics:
        rep.notes.append(f"post-arrival {k}: {median(lat[k]) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
