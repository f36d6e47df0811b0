"""Post-arrival latency: last update's last byte -> global model pullable, ÷ the time Flower's
FedAvg (flwr 1.42 ``FedAvg.aggregate_train``) takes once all N updates have arrived
(issue 2, goal <= 0.05 at N = 100, and flat in N).

LIFL runs in its own process with its defaults (4 leaves, fan-in 4, 4 functions).
A round of N updates is pushed over real gRPC by 4 concurrent client threads;
then the main thread pulls with a wait. Three LIFL figures per round:

- ``server``: ``round_info().post_arrival_seconds``, measured by the server from
  accepting the last update to the result being published;
- ``client, pullable``: last push acknowledged -> the Pull stream's first message
  (the header, sent once the result exists);
- ``client, pulled``: last push acknowledged -> the whole model downloaded.

The peer is ``FedAvg().aggregate_train(round, replies)`` on N real flwr reply
Messages (ArrayRecord + MetricRecord 'num-examples') holding the same N updates
and weights, timed in this process, interleaved with the LIFL rounds.

    python -m benchmarks.bench_latency [--quick]
"""
from __future__ import annotations

import threading
import time

import numpy as np

from lifl.client import Client
from lifl.layout import Layout
from lifl.v1 import aggregation_pb2 as pb

from .common import (Report, ServerProc, available_bytes, flower_aggregate, flower_reply, interleave,
                     model_arrays, parser, perturbed)

PUSHERS = 4


def lifl_round(addr_clients, admin: Client, layout: Layout, pool, weights, n: int) -> dict:
    rid = admin.open_round(layout=layout, expected=n)
    done_at = [0.0] * PUSHERS
    errors = []

    def pusher(t: int) -> None:
        try:
            cl = addr_clients[t]
            for i in range(t, n, PUSHERS):
                cl.push(rid, pool[i % len(pool)], num_examples=weights[i], client_id=f"c{i}")
            done_at[t] = time.perf_counter()
        except Exception as e:  # surfaced below
            errors.append(e)

    ths = [threading.Thread(target=pusher, args=(t,)) for t in range(PUSHERS)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errors:
        raise errors[0]
    last = max(done_at)
    stream = admin._pull(pb.PullRequest(job="default", round=rid, wait_seconds=120, kind=pb.MODEL_KIND_RESULT))
    next(stream)
    t_header = time.perf_counter()
    got = sum(len(m) for m in stream)
    t_full = time.perf_counter()
    info = admin.round_info(rid)
    if info.state != "done":
        raise RuntimeError(f"round {rid} ended {info.state}: {info.detail}")
    return {"server": info.post_arrival_seconds, "pullable": t_header - last, "pulled": t_full - last,
            "rid": rid, "bytes": got}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--clients", default=None, help="comma-separated N values (default 10,100,400; quick 10,30)")
    p.add_argument("--pool", type=int, default=16, help="distinct client updates cycled through by the pushers")
    args = p.parse_args(argv)
    reps = args.reps or 5
    ns = [int(x) for x in (args.clients or ("10,30" if args.quick else "10,100,400")).split(",")]

    base = model_arrays(args.model)
    layout = Layout.from_arrays(base)
    size = layout.total_size
    pool = [perturbed(base, i) for i in range(args.pool)]
    rng = np.random.default_rng(7)
    rep = Report("bench_latency", "Post-arrival latency ÷ Flower FedAvg.aggregate_train on the same N updates "
                 "(lower is better)",
                 {"model": f"{args.model}: {layout.describe()}", "N": ns, "reps per N (interleaved)": reps,
                  "LIFL": "own process, defaults (workers=4, leaves=4, fan_in=4), 4 concurrent pushers",
                  "Flower": "flwr 1.42 FedAvg().aggregate_train(1, replies), replies = real Messages",
                  "quick": args.quick})
    with ServerProc("lifl") as srv:
        clients = [Client(srv.address) for _ in range(PUSHERS)]
        admin = Client(srv.address)
        lifl_round(clients, admin, layout, pool, [1.0] * 4, 4)  # warm the functions and slot cache
        for n in ns:
            weights = [float(w) for w in rng.integers(1, 500, n)]
            # Flower's replies: one ArrayRecord per client when memory allows, else shared payloads
            need = n * size * 1.3 + 4 * 2**30
            distinct = need < available_bytes()
            t0 = time.perf_counter()
            if distinct:
                replies = [flower_reply(pool[i % len(pool)], weights[i], i + 1) for i in range(n)]
            else:
                shared = [flower_reply(pool[j], 1.0, j + 1).content["arrays"] for j in range(len(pool))]
                replies = []
                for i in range(n):
                    m = flower_reply({"x": np.zeros(1, np.float32)}, weights[i], i + 1)
                    m.content["arrays"] = shared[i % len(pool)]
                    replies.append(m)
                rep.notes.append(f"N={n}: not enough free memory for {n} distinct ArrayRecords "
                                 f"({n * size / 2**30:.1f} GiB); the replies share {len(pool)} distinct "
                                 f"ArrayRecords ({len(pool) * size / 2**20:.0f} MiB, larger than the CPU's "
                                 "last-level cache); Flower still deserializes and folds each reply separately")
            print(f"N={n}: built {n} Flower replies in {time.perf_counter() - t0:.1f} s "
                  f"({'distinct' if distinct else 'shared payloads'})", flush=True)

            lifl_res = []

            def lifl_case():
                r = lifl_round(clients, admin, layout, pool, weights, n)
                lifl_res.append(r)
                return r

            def flower_case():
                t = time.perf_counter()
                flower_aggregate(replies)
                return time.perf_counter() - t

            s = interleave([("lifl", lifl_case), ("flower", flower_case)], reps, warmup=0)
            fl = s["flower"]
            rep.add(f"N={n}", "server post_arrival ÷ Flower", [r["server"] for r in s["lifl"]], fl, "ms",
                    goal="<= 0.05" if n >= 100 else "-", better="lower",
                    threshold=0.05 if n >= 100 else None, peer_label="Flower", scale=1e3)
            rep.add(f"N={n}", "client last push -> pullable ÷ Flower", [r["pullable"] for r in s["lifl"]], fl, "ms",
                    peer_label="Flower", scale=1e3)
            rep.add(f"N={n}", "client last push -> pulled ÷ Flower", [r["pulled"] for r in s["lifl"]], fl, "ms",
                    peer_label="Flower", scale=1e3)
            # check once that both sides computed the same model
            got = admin.pull(lifl_res[-1]["rid"])
            ref, _ = flower_aggregate(replies)
            worst = max(float(np.max(np.abs(got[k].astype(np.float64) - ref[k].numpy().astype(np.float64))
                                     / (np.abs(ref[k].numpy().astype(np.float64)) + 1e-3)))
                        for k in got if got[k].dtype.kind == "f")
            rep.notes.append(f"N={n}: LIFL's model vs Flower's: max relative difference {worst:.2e} "
                             "(Flower accumulates in float32)")
            del replies, ref, got
        for cl in [*clients, admin]:
            cl.close()
    lat = {r.case: r.ours for r in rep.rows if r.metric.startswith("server")}
    rep.notes.append("LIFL server post-arrival medians by N (flatness): "
                     + ", ".join(f"{k}: {v:.1f} ms" for k, v in lat.items()))
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
