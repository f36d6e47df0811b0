"""Peak memory of the aggregation side ÷ Flower's, for the same N updates (issue 2,
goal <= 0.1 at N = 200, ResNet-18).

LIFL: a fresh embedded server in its own process per repetition (defaults:
4 leaves, fan-in 4, 4 aggregator functions; ``--budget-mb`` slot budget). The
benchmark process only plays the clients (4 concurrent pushers), so the
sampled process tree (server + function processes) is the aggregation side.
Flower: a fresh child process that builds N real reply Messages (one
``ArrayRecord`` per client, as the ServerApp holds them) and runs
``FedAvg().aggregate_train``. For both, a thread here samples the process tree
(``benchmarks.procsampler``): Σ RssAnon + /dev/shm bytes every 5 ms, Σ PSS from
/proc/<pid>/smaps_rollup every 40 ms (PSS charges each shared-memory page once in
total), and the idle baseline taken just before the work starts is subtracted. Repetitions alternate LIFL, Flower, LIFL, …

    python -m benchmarks.bench_memory [--quick]
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np

from lifl.client import Client
from lifl.layout import Layout

from .common import ROOT, Report, ServerProc, interleave, model_arrays, parser, perturbed
from .procsampler import ProcSampler

PUSHERS = 4


def peaks(sampler: ProcSampler) -> dict:
    """Peaks over the idle baseline (the first sample, taken just before the work starts)."""
    base = sampler.samples[0]
    return {"peak_anon_shm": sampler.peak_anon_shm - base.anon_shm, "peak": sampler.peak_pss - base.pss,
            "peak_rss": sampler.peak_rss - base.rss, "baseline_pss": base.pss, "samples": sampler.ticks}


def lifl_rep(model: str, n: int, budget_mb: int, pool) -> dict:
    layout = Layout.from_arrays(pool[0])
    weights = [float(10 + i % 50) for i in range(n)]
    with ServerProc("lifl", shm_budget_mb=budget_mb) as srv:
        clients = [Client(srv.address) for _ in range(PUSHERS + 1)]
        time.sleep(0.3)
        with ProcSampler(srv.pid, shm_prefix="lifl-") as sampler:
            rid = clients[-1].open_round(layout=layout, expected=n)
            errors = []

            def pusher(t):
                try:
                    for i in range(t, n, PUSHERS):
                        clients[t].push(rid, pool[i % len(pool)], num_examples=weights[i], client_id=f"c{i}")
                except Exception as e:
                    errors.append(e)

            ths = [threading.Thread(target=pusher, args=(t,)) for t in range(PUSHERS)]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            if errors:
                raise errors[0]
            clients[-1].pull(rid, wait_s=300)
            wall = time.perf_counter() - t0
            time.sleep(0.05)
        for c in clients:
            c.close()
    return {**peaks(sampler), "peak_shm": sampler.peak_shm, "wall": wall}


def flower_rep(model: str, n: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_memory", "--flower-child", model, str(n)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(0.2)
    with ProcSampler(proc.pid) as sampler:
        t0 = time.perf_counter()
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        wall = time.perf_counter() - t0
    proc.stdin.close()
    proc.wait()
    return {**peaks(sampler), "wall": wall, **result}


def flower_child(model: str, n: int) -> None:
    """Hold N reply Messages the way Flower's ServerApp does, then aggregate them with FedAvg."""
    from .common import flower_aggregate, flower_reply

    import flwr.serverapp.strategy  # noqa: F401  (imports count as baseline)

    base = model_arrays(model)
    print("READY", flush=True)
    sys.stdin.readline()
    replies = []
    for i in range(n):
        upd = perturbed(base, i)          # the client's update as it arrives ...
        replies.append(flower_reply(upd, float(10 + i % 50), i + 1))
        del upd                           # ... only Flower's Message keeps it
    t = time.perf_counter()
    flower_aggregate(replies)
    print(json.dumps({"aggregate_s": time.perf_counter() - t}), flush=True)
    sys.stdin.readline()


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--flower-child":
        flower_child(sys.argv[2], int(sys.argv[3]))
        return
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--budget-mb", type=int, default=512, help="LIFL slot budget (shm_budget_mb)")
    args = p.parse_args(argv)
    reps = args.reps or 5
    model = args.model or ("mlp1m" if args.quick else "resnet18")
    n = args.clients or (40 if args.quick else 200)

    base = model_arrays(model)
    layout = Layout.from_arrays(base)
    size = layout.total_size
    pool = [perturbed(base, i) for i in range(8)]
    print(f"bench_memory: {model} ({layout.describe()}), N={n}, {reps} reps", flush=True)
    s = interleave([("lifl", lambda: lifl_rep(model, n, args.budget_mb, pool)),
                    ("flower", lambda: flower_rep(model, n))], reps, warmup=0)
    mib = 1 / 2**20
    goal_case = model == "resnet18" and n >= 200
    rep = Report("bench_memory", "Peak memory of the aggregation side ÷ Flower's, same N updates (lower is better)",
                 {"model": f"{model}: {layout.describe()}", "N": n, "reps (interleaved)": reps,
                  "LIFL": f"fresh server process per rep, workers=4, leaves=4, fan_in=4, "
                          f"shm_budget_mb={args.budget_mb}; clients in the benchmark process",
                  "Flower": "fresh process per rep holding N reply Messages, then FedAvg().aggregate_train",
                  "measure": "peak Σ PSS of the process tree (40 ms sampling) and peak Σ RssAnon + /dev/shm (5 ms), minus idle baselines",
                  "quick": args.quick})
    rep.add(f"N={n}", "peak Σ PSS ÷ Flower", [r["peak"] for r in s["lifl"]], [r["peak"] for r in s["flower"]],
            "MiB", goal="<= 0.1" if goal_case else "(goal at N=200, resnet18)", better="lower",
            threshold=0.1 if goal_case else None, peer_label="Flower", scale=mib)
    rep.add(f"N={n}", "peak Σ(RssAnon) + /dev/shm ÷ Flower", [r["peak_anon_shm"] for r in s["lifl"]],
            [r["peak_anon_shm"] for r in s["flower"]], "MiB", goal="(5 ms samples)", peer_label="Flower", scale=mib)
    rep.add(f"N={n}", "peak Σ RSS ÷ Flower (shm counted per mapper)", [r["peak_rss"] for r in s["lifl"]],
            [r["peak_rss"] for r in s["flower"]], "MiB", peer_label="Flower", scale=mib)
    lm = float(np.median([r["peak"] for r in s["lifl"]]))
    rep.notes.append(f"one update = {size * mib:.1f} MiB; LIFL peak = {lm / size:.1f} updates' worth; "
                     f"Flower peak = {float(np.median([r['peak'] for r in s['flower']])) / size:.1f} updates' worth")
    rep.notes.append(f"LIFL peak /dev/shm in use (median): {np.median([r['peak_shm'] for r in s['lifl']]) * mib:.0f} MiB;"
                     f" idle baseline Σ PSS {np.median([r['baseline_pss'] for r in s['lifl']]) * mib:.0f} MiB "
                     f"(server + functions), Flower's {np.median([r['baseline_pss'] for r in s['flower']]) * mib:.0f} MiB")
    rep.notes.append(f"wall per rep (median): LIFL {np.median([r['wall'] for r in s['lifl']]):.1f} s (N pushes over "
                     f"gRPC + result), Flower {np.median([r['wall'] for r in s['flower']]):.1f} s (build N Messages + "
                     f"aggregate {np.median([r['aggregate_s'] for r in s['flower']]):.1f} s); "
                     f"samples/rep LIFL {int(np.median([r['samples'] for r in s['lifl']]))}, "
                     f"Flower {int(np.median([r['samples'] for r in s['flower']]))}")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
