"""Ray runtime: its cost against the embedded runtime on one machine, and what locality saves.

Part 1 — one machine. A one-node local Ray cluster; LIFL with ``runtime="ray"``
and LIFL with the embedded ``local`` runtime each run in their own process
(``ServerProc``), same settings, alive together; rounds alternate between them
(A B A B ...). A round: ``--updates`` sequential pushes of one model from this
process, then wait for the result. Ingest throughput = update bytes ÷ (first
push sent → last push acknowledged); post-arrival latency = the server's own
``post_arrival_seconds`` (last update accepted → model pullable). Ratio = Ray ÷
embedded (goal: throughput ≥ 0.8).

Part 2 — three nodes. A local Ray cluster of three nodes (distinct CPU counts);
LIFL with locality-aware placement, then with random placement (the baseline),
each for ``--rounds`` rounds of ``--clients`` clients spread evenly over the
three nodes' gateways. Cross-node bytes are scraped from each server's
``/metrics`` (``lifl_cross_node_bytes``: updates, partial sums; the result's
single trip to the head is reported apart). Ratio = locality ÷ random (goal ≤ 0.2).

    python -m benchmarks.bench_ray [--quick]
"""
from __future__ import annotations

import itertools
import time
import urllib.request

from lifl.client import Client
from lifl.layout import Layout

from .common import MiB, Report, ServerProc, interleave, model_arrays, parser, perturbed


def _cluster(nodes: list[int]):
    import ray
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": nodes[0], "object_store_memory": 512 * MiB})
    for cpus in nodes[1:]:
        c.add_node(num_cpus=cpus, object_store_memory=512 * MiB)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)  # only to see the nodes; servers connect themselves
    return c


def _gateways(address: str) -> list[str]:
    with Client(address) as c:
        st = c.status()
    return [address] + [g.split("=", 1)[1] for g in st.gateways]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "lifl_cross_node_bytes":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["kind"]] = s.value
    return out


def one_round(admin: Client, gateways: list[str], updates, ids) -> dict:
    rid = admin.open_round(updates[0], expected=len(updates))
    clients = [Client(g) for g in gateways]
    try:
        t0 = time.perf_counter()
        for i, u in enumerate(updates):
            clients[i % len(clients)].push(rid, u, 1.0 + i % 3, f"c{next(ids)}")
        t_in = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    admin.pull(rid, wait_s=300)
    info = admin.round_info(rid)
    size = Layout.from_arrays(updates[0]).total_size
    return {"ingest_Bps": size * len(updates) / t_in, "post_arrival_s": info.post_arrival_seconds}


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="part 1 model (default resnet18; mlp1m with --quick)")
    p.add_argument("--updates", type=int, default=None, help="part 1: pushes per round")
    p.add_argument("--clients", default=None, help="part 2: clients per round, comma-separated")
    p.add_argument("--rounds", type=int, default=None, help="part 2: rounds per placement")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    model = args.model or ("mlp1m" if args.quick else "resnet18")
    n_up = args.updates or (4 if args.quick else 8)
    client_counts = [int(x) for x in (args.clients or ("12,30" if args.quick else "12,30,60")).split(",")]
    rounds = args.rounds or (2 if args.quick else 3)
    import ray

    rep = Report("bench_ray", "Ray runtime ÷ embedded runtime; locality ÷ random placement",
                 {"model (part 1)": model, "updates per round": n_up, "reps": reps,
                  "clients (part 2)": client_counts, "rounds per placement": rounds})
    ids = itertools.count()
    common = dict(workers=4, leaves=1, fan_in=2, planner="static", shm_budget_mb=1024, keep_alive_s=30)

    # -- part 1: one machine ---------------------------------------------------------------
    base = model_arrays(model)
    updates = [perturbed(base, i) for i in range(n_up)]
    c1 = _cluster([2])
    try:
        with ServerProc("lifl", **common) as emb, \
                ServerProc("lifl", runtime="ray", ray_address=c1.address, **common) as onray, \
                Client(emb.address) as a_emb, Client(onray.address) as a_ray:
            g_emb, g_ray = _gateways(emb.address), _gateways(onray.address)
            out = interleave([("embedded", lambda: one_round(a_emb, g_emb, updates, ids)),
                              ("ray", lambda: one_round(a_ray, g_ray, updates, ids))], reps)
        rep.add("one machine", "ingest throughput", [r["ingest_Bps"] for r in out["ray"]],
                [r["ingest_Bps"] for r in out["embedded"]], "MiB/s", goal=">= 0.8", better="higher",
                threshold=0.8, ours_label="ray", peer_label="embedded", scale=1 / MiB)
        rep.add("one machine", "post-arrival latency", [r["post_arrival_s"] for r in out["ray"]],
                [r["post_arrival_s"] for r in out["embedded"]], "ms", ours_label="ray", peer_label="embedded",
                scale=1000.0)
    finally:
        ray.shutdown()
        c1.shutdown()

    # -- part 2: three nodes, locality vs random placement ------------------------------------
    small = model_arrays("mlp1m")
    c3 = _cluster([2, 3, 4])
    try:
        for n in client_counts:
            ups = [perturbed(small, i) for i in range(n)]
            crossed: dict[str, list[dict]] = {}
            for placement in ("locality", "random"):
                crossed[placement] = []
                with ServerProc("lifl", runtime="ray", ray_address=c3.address, placement=placement,
                                **{**common, "metrics_port": 0}) as srv, Client(srv.address) as admin:
                    gws = _gateways(srv.address)
                    for _ in range(rounds):
                        before = _scrape(srv.metrics_port)
                        one_round(admin, gws, ups, ids)
                        after = _scrape(srv.metrics_port)
                        crossed[placement].append({k: after.get(k, 0) - before.get(k, 0) for k in after})
            moved = {pl: [r.get("update", 0) + r.get("partial", 0) for r in rs] for pl, rs in crossed.items()}
            rep.add(f"3 nodes, {n} clients", "cross-node bytes per round (updates + partials)",
                    moved["locality"], moved["random"], "MiB", goal="<= 0.2", better="lower", threshold=0.2,
                    ours_label="locality", peer_label="random", scale=1 / MiB,
                    note=f"locality moved updates {sum(r.get('update', 0) for r in crossed['locality']):.0f} B "
                         f"in all; result to head per round: "
                         f"{[round(r.get('result', 0) / MiB, 1) for r in crossed['locality']]} MiB")
            rep.raw[f"crossed|{n}"] = crossed
    finally:
        ray.shutdown()
        c3.shutdown()
    rep.notes.append("part 2 uses the 1M-parameter layout (4 MiB updates, 8 MiB float64 partials); "
                     "one leaf per node (static plan) so both placements fold the same tree")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
