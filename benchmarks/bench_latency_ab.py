"""Post-arrival latency of several code trees, their rounds interleaved: a before/after check
for engine changes on one machine (one server per tree, each from its own checkout).

    git archive <rev> | tar -x -C /tmp/before    # any trees, each with its C kernel built
    python -m benchmarks.bench_latency_ab /tmp/before . [--clients 100] [--reps 7] [--config '{"leaves": 4}']

Prints each tree's median server post-arrival latency and every round's figure.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from lifl.client import Client
from lifl.layout import Layout

from .bench_latency import PUSHERS, lifl_round
from .common import ServerProc, model_arrays, parser, perturbed


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("trees", nargs="+", help="checkouts to compare (each serves from its own code)")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--config", default="{}", help="ServerConfig settings (JSON) for every server")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    servers = [ServerProc("lifl", root=Path(t), **json.loads(args.config)) for t in args.trees]
    try:
        base = model_arrays(args.model)
        layout = Layout.from_arrays(base)
        pool = [perturbed(base, i) for i in range(16)]
        weights = [float(w) for w in np.random.default_rng(0).integers(1, 500, args.clients)]
        conns = [([Client(s.address) for _ in range(PUSHERS)], Client(s.address)) for s in servers]
        for c in conns:   # warm the functions and the slot cache
            lifl_round(*c, layout, pool, [1.0] * 4, 4)
        res: list[list[float]] = [[] for _ in servers]
        for r in range(reps):   # alternate the order so that no tree always goes first
            for i in (range(len(servers)) if r % 2 == 0 else reversed(range(len(servers)))):
                res[i].append(lifl_round(*conns[i], layout, pool, weights, args.clients)["server"] * 1e3)
        print(f"post-arrival latency, {args.model}, N = {args.clients}, {reps} interleaved rounds each, "
              f"config {args.config}")
        for tree, v in zip(args.trees, res):
            print(f"{tree:>24}: median {statistics.median(v):7.1f} ms   ({', '.join(f'{x:.1f}' for x in v)})")
    finally:
        for s in servers:
            s.close()


if __name__ == "__main__":
    main()
