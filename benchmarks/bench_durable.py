"""What durable mode costs: push ingest, acknowledgements per second under concurrent small
pushes, and the post-arrival latency seen by a client, each durable ÷ the default mode,
interleaved in one run.

Three LIFL servers run in their own processes (``benchmarks.common.ServerProc``) with the same
settings: ``default``, ``durable`` (``durable_dir`` in a fresh directory on this machine's disk —
every update's bytes and a log record fsynced before its acknowledgement, each result before it
is served) and ``control``, a second default server: its row is this machine's noise floor (an
A/A comparison). Samples:

- *ingest*: ``--updates`` sequential pushes of one ``--model`` update; the clock stops at the last
  acknowledgement (GiB/s);
- *post-arrival*: in the same round, from the last acknowledgement to the client holding the
  result (a Pull waiting for it): fold, finalize — and in durable mode the result's write and fsync;
- *acks/s*: ``--small-updates`` pushes of a small model (mlp1m, 3.8 MiB) from 8 client threads at
  once; acknowledgements per second (durable: one log fsync each, under the engine's lock).

    python -m benchmarks.bench_durable [--quick] [--reps 5] [--model resnet18]
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lifl.client import Client
from lifl.layout import Layout

from .common import Report, ServerProc, interleave, model_arrays, parser


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--updates", type=int, default=None, help="sequential pushes per ingest sample")
    p.add_argument("--small-updates", type=int, default=None, help="concurrent small pushes per acks/s sample")
    args = p.parse_args(argv)
    reps = args.reps or 5
    n_up = args.updates or (2 if args.quick else 4)
    n_small = args.small_updates or (16 if args.quick else 48)
    big, small = model_arrays(args.model), model_arrays("mlp1m")
    big_layout, small_layout = Layout.from_arrays(big), Layout.from_arrays(small)
    ids = itertools.count()
    where = Path(tempfile.mkdtemp(prefix="lifl-bench-durable-", dir=str(Path.home())))
    cfg = {"workers": 2, "leaves": 1, "shm_budget_mb": 1024}
    try:
        with ServerProc("lifl", **cfg) as base, ServerProc("lifl", durable_dir=str(where), **cfg) as durable, \
                ServerProc("lifl", **cfg) as control:
            addr = {"default": base.address, "durable": durable.address, "control": control.address}

            def ingest(which):
                def run():
                    with Client(addr[which]) as c:
                        rid = c.open_round(layout=big_layout, expected=n_up)
                        t0 = time.perf_counter()
                        for _ in range(n_up):
                            c.push(rid, big, num_examples=10, client_id=f"c{next(ids)}")
                        t1 = time.perf_counter()
                        c.pull(rid, wait_s=120)
                        t2 = time.perf_counter()
                    return n_up * big_layout.total_size / (t1 - t0) / 2**30, (t2 - t1) * 1e3
                return run

            def acks(which):
                def run():
                    with Client(addr[which]) as admin:
                        rid = admin.open_round(layout=small_layout, expected=n_small)
                        clients = [Client(addr[which]) for _ in range(8)]
                        t0 = time.perf_counter()
                        with ThreadPoolExecutor(8) as pool:
                            list(pool.map(lambda i: clients[i % 8].push(rid, small, 10, f"s{next(ids)}"),
                                          range(n_small)))
                        dt = time.perf_counter() - t0
                        admin.pull(rid, wait_s=120)
                        for c in clients:
                            c.close()
                    return n_small / dt
                return run

            cases = [(f"{k}_{w}", f(w)) for w in ("default", "durable", "control")
                     for k, f in (("ingest", ingest), ("acks", acks))]
            print(f"bench_durable: {args.model} ({big_layout.describe()}), {n_up} pushes per ingest sample; "
                  f"{n_small} mlp1m pushes from 8 threads per acks/s sample; {reps} reps; durable_dir {where}",
                  flush=True)
            s = interleave(cases, reps)
    finally:
        shutil.rmtree(where, ignore_errors=True)

    gib = {w: [v[0] for v in s[f"ingest_{w}"]] for w in ("default", "durable", "control")}
    post = {w: [v[1] for v in s[f"ingest_{w}"]] for w in ("default", "durable", "control")}
    rate = {w: s[f"acks_{w}"] for w in ("default", "durable", "control")}
    rep = Report("bench_durable", "what durable mode costs: durable ÷ default (interleaved)",
                 {"model": f"{args.model}: {big_layout.describe()}", "pushes per ingest sample": n_up,
                  "small pushes per acks/s sample": f"{n_small} × mlp1m from 8 threads",
                  "durable_dir": "a fresh directory under $HOME (this machine's disk)",
                  "servers": "own processes, workers=2, leaves=1; one at a time", "reps (interleaved)": reps,
                  "quick": args.quick})
    for w, label in (("durable", "durable"), ("control", "same")):
        rep.add("ingest", f"{w}: sequential push GiB/s ÷ default", gib[w], gib["default"], "GiB/s",
                ours_label=label, peer_label="default")
        rep.add("post-arrival", f"{w}: last ack → result pulled, ms ÷ default", post[w], post["default"], "ms",
                ours_label=label, peer_label="default")
        rep.add("acks/s", f"{w}: concurrent small pushes acknowledged per s ÷ default", rate[w], rate["default"],
                "1/s", ours_label=label, peer_label="default")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
