"""gRPC ingest: update bytes/s into LIFL's shared memory ÷ the same client streaming to a
bare grpcio null sink, interleaved in one run (issue 2, goal >= 0.9).

Both servers run in their own processes (``benchmarks.common.ServerProc``):
LIFL's embedded server with its defaults (4 aggregator functions, non-finite
check on) and a grpcio server whose stream-unary ``Push`` handler takes raw
bytes (identity deserializer) and only counts them. The client is
``lifl.client.Client.push`` in both cases: same header, same chunking, same
bytes. A sample is ``--updates`` sequential pushes of one ResNet-18 update;
for LIFL the clock stops when the last push is acknowledged (the update is in
its slot and accepted), the rest of the round is waited for outside the clock.

    python -m benchmarks.bench_ingest [--quick]
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
    p.add_argument("--updates", type=int, default=None, help="pushes per sample")
    p.add_argument("--chunks", default="1,2,4", help="chunk sizes in MiB")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to wait after each sample, outside the clock: a round's clean-up (unlinking "
                        "its shared memory) then does not overlap the next case's sample")
    p.add_argument("--ab", default="", help="another checkout: its server (defaults) as a case too, "
                                            "for a before/after ratio (its C kernel built)")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 7)
    n_up = args.updates or (3 if args.quick else 8)
    chunks = [int(c) for c in args.chunks.split(",")]

    arrays = model_arrays(args.model)
    layout = Layout.from_arrays(arrays)
    size = layout.total_size
    ids = itertools.count()
    diag_c = 2 if 2 in chunks else chunks[0]
    with ServerProc("lifl") as lifl_srv, ServerProc("null") as null_srv, \
            ServerProc("lifl", reject_nonfinite=False) as nocheck_srv, \
            ServerProc("lifl", grpc_bdp_probe=True) as bdp_srv, \
            ServerProc("lifl", release_idle_shm=False) as keep_srv, \
            (ServerProc("lifl", root=Path(args.ab)) if args.ab else contextlib.nullcontext()) as ab_srv:
        clients = {}
        for c in chunks:
            clients[("lifl", c)] = Client(lifl_srv.address, chunk_size=c * MiB)
            clients[("null", c)] = Client(null_srv.address, chunk_size=c * MiB)
        clients[("nocheck", diag_c)] = Client(nocheck_srv.address, chunk_size=diag_c * MiB)
        clients[("bdp", diag_c)] = Client(bdp_srv.address, chunk_size=diag_c * MiB)
        clients[("keep", diag_c)] = Client(keep_srv.address, chunk_size=diag_c * MiB)
        admins = {"lifl": Client(lifl_srv.address), "nocheck": Client(nocheck_srv.address),
                  "bdp": Client(bdp_srv.address), "keep": Client(keep_srv.address)}
        if args.ab:
            clients[("ab", diag_c)] = Client(ab_srv.address, chunk_size=diag_c * MiB)
            admins["ab"] = Client(ab_srv.address)

        def lifl_case(c, which="lifl"):
            cl = clients[(which, c)]
            admin = admins[which]

            def run():
                rid = admin.open_round(layout=layout, expected=n_up)
                t0 = time.perf_counter()
                for _ in range(n_up):
                    cl.push(rid, arrays, num_examples=10, client_id=f"c{next(ids)}")
                dt = time.perf_counter() - t0
                admin.pull(rid, wait_s=120)  # let the round finish outside the clock
                time.sleep(args.settle)
                return dt
            return run

        def null_case(c):
            cl = clients[("null", c)]

            def run():
                t0 = time.perf_counter()
                for _ in range(n_up):
                    cl.push(0, arrays, num_examples=10, client_id=f"c{next(ids)}")
                dt = time.perf_counter() - t0
                time.sleep(args.settle)
                return dt
            return run

        cases = []
        for c in chunks:
            cases += [(f"null{c}", null_case(c)), (f"lifl{c}", lifl_case(c))]
        if args.ab:
            cases += [(f"ab{diag_c}", lifl_case(diag_c, "ab"))]
        # diagnostic: memory kept between rounds (each sample is a round; by default its slots and
        # accumulators are fresh pages, bench_round_start)
        cases += [(f"keep{diag_c}", lifl_case(diag_c, "keep"))]
        if not args.quick:  # diagnostics: the same server without the non-finite scan; with BDP probing
            cases += [(f"nocheck{diag_c}", lifl_case(diag_c, "nocheck")), (f"bdp{diag_c}", lifl_case(diag_c, "bdp"))]
        print(f"bench_ingest: {args.model} ({layout.describe()}), {n_up} pushes per sample, chunks {chunks} MiB, "
              f"{reps} reps", flush=True)
        s = interleave(cases, reps)
        for cl in [*clients.values(), *admins.values()]:
            cl.close()

    gibs = {k: [n_up * size / t / 2**30 for t in v] for k, v in s.items()}
    rep = Report("bench_ingest", "gRPC ingest into shared memory ÷ grpcio null sink, same client (higher is better)",
                 {"model": f"{args.model}: {layout.describe()}", "pushes per sample": n_up,
                  "transport": "grpcio, insecure, loopback; one client stream at a time",
                  "LIFL server": "own process, defaults (workers=4, leaves=4, reject_nonfinite=on)",
                  "null sink": "own process, stream-unary handler, identity deserializer, counts bytes",
                  "reps (interleaved)": reps, "quick": args.quick, "settle after each sample (s)": args.settle})
    for c in chunks:
        rep.add(f"chunk {c} MiB", "LIFL GiB/s ÷ null sink GiB/s", gibs[f"lifl{c}"], gibs[f"null{c}"], "GiB/s",
                goal=">= 0.9", better="higher", threshold=0.9, peer_label="null")
    rep.add(f"chunk {diag_c} MiB", "diagnostic: release_idle_shm=false ÷ null", gibs[f"keep{diag_c}"],
            gibs[f"null{diag_c}"], "GiB/s", goal="(diagnostic)", ours_label="LIFL-keep", peer_label="null")
    if f"nocheck{diag_c}" in gibs:
        rep.add(f"chunk {diag_c} MiB", "diagnostic: reject_nonfinite=off ÷ null", gibs[f"nocheck{diag_c}"],
                gibs[f"null{diag_c}"], "GiB/s", goal="(diagnostic)", ours_label="LIFL-nocheck", peer_label="null")
        rep.add(f"chunk {diag_c} MiB", "diagnostic: grpc_bdp_probe=on ÷ null", gibs[f"bdp{diag_c}"],
                gibs[f"null{diag_c}"], "GiB/s", goal="(diagnostic)", ours_label="LIFL-bdp", peer_label="null")
    if args.ab:
        rep.add(f"chunk {diag_c} MiB", f"this tree ÷ {args.ab} (before/after)", gibs[f"lifl{diag_c}"],
                gibs[f"ab{diag_c}"], "GiB/s", goal="(no regression: ~1)", ours_label="this", peer_label="other")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
