"""What a round's start costs: opening it, and pushes into fresh shared memory.

With ``release_idle_shm`` (the default) a server that runs no round unlinks its cached update
slots and accumulators, so the next round maps fresh pages: the kernel zeroes them, and every
process that touches them maps them. A round of few updates pays that on every push. Cases,
interleaved in one run, each a round of ``--updates`` sequential pushes of one ResNet-18 update
from one client (the clock stops at the last acknowledgement; the round is finished and pulled
outside it, and ``--settle`` seconds pass before the next case, so one server's clean-up does
not land in another's sample):

- LIFL with its defaults ÷ LIFL with ``release_idle_shm = false`` (memory kept across rounds);
- LIFL with its defaults ÷ the grpcio null sink (``bench_ingest``'s peer);
- ``--ab ROOT``: this tree ÷ another checkout, per push and per ``OpenRound`` (its C kernel built).

    python -m benchmarks.bench_round_start [--quick] [--reps 7] [--ab /tmp/base]
"""
from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path

from lifl.client import Client
from lifl.layout import Layout

from .common import MiB, Report, ServerProc, interleave, model_arrays, parser


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--updates", type=int, default=3, help="pushes per round (one sample)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--ab", default="", help="another checkout: its server (defaults) as a case too")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    arrays = model_arrays("mlp1m" if args.quick else args.model)
    layout = Layout.from_arrays(arrays)
    ids = itertools.count()
    opens: dict[str, list[float]] = {}
    with ServerProc("lifl") as lifl_srv, ServerProc("lifl", release_idle_shm=False) as keep_srv, \
            ServerProc("null") as null_srv, \
            (ServerProc("lifl", root=Path(args.ab)) if args.ab else contextlib.nullcontext()) as ab_srv:
        servers = {"lifl": lifl_srv, "keep": keep_srv, "null": null_srv}
        if args.ab:
            servers["ab"] = ab_srv
        clients = {k: Client(s.address, chunk_size=2 * MiB) for k, s in servers.items()}

        def case(name):
            cl = clients[name]

            def run():
                rid = 0
                if name != "null":
                    t0 = time.perf_counter()
                    rid = cl.open_round(layout=layout, expected=args.updates)
                    opens.setdefault(name, []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for _ in range(args.updates):
                    cl.push(rid, arrays, num_examples=10, client_id=f"c{next(ids)}")
                dt = (time.perf_counter() - t0) / args.updates
                if name != "null":
                    cl.pull(rid, wait_s=120)
                time.sleep(args.settle)
                return dt
            return run

        print(f"bench_round_start: {layout.describe()}, {args.updates} pushes per round, {reps} reps", flush=True)
        s = interleave([(k, case(k)) for k in servers], reps)
        for cl in clients.values():
            cl.close()
    opens = {k: v[-reps:] for k, v in opens.items()}   # the warm-up round's open is not a sample
    rep = Report("bench_round_start", "A round's start: pushes into fresh shared memory, and OpenRound "
                 "(time per push / per open, lower is better)",
                 {"model": layout.describe(), "pushes per round": args.updates, "client": "one, sequential pushes, "
                  "chunk 2 MiB", "LIFL": "own process, defaults", "keep": "LIFL, release_idle_shm = false",
                  "null sink": "grpcio, counts bytes", "settle between samples (s)": args.settle,
                  "reps (interleaved)": reps})
    ms = 1e3
    rep.add("push, fresh memory each round", "LIFL defaults ÷ release_idle_shm=false", s["lifl"], s["keep"], "ms",
            scale=ms, ours_label="defaults", peer_label="kept")
    rep.add("push", "LIFL defaults ÷ null sink", s["lifl"], s["null"], "ms", scale=ms, peer_label="null")
    rep.add("push", "release_idle_shm=false ÷ null sink", s["keep"], s["null"], "ms", scale=ms,
            ours_label="kept", peer_label="null")
    rep.add("OpenRound", "LIFL defaults ÷ release_idle_shm=false", opens["lifl"], opens["keep"], "ms", scale=ms,
            ours_label="defaults", peer_label="kept")
    if args.ab:
        rep.add("push", f"this tree ÷ {args.ab}", s["lifl"], s["ab"], "ms", scale=ms, ours_label="this",
                peer_label="other")
        rep.add("OpenRound", f"this tree ÷ {args.ab}", opens["lifl"], opens["ab"], "ms", scale=ms,
                ours_label="this", peer_label="other")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
