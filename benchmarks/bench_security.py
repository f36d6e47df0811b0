"""What trust costs: push ingest and small-call latency with signed credentials, and ingest with
L2 screening (norm only, and clipping every update), each ÷ the same server without, interleaved
in one run.

Four LIFL servers run in their own processes (``benchmarks.common.ServerProc``) with the same
defaults: ``base`` (no credentials, no screening), ``signed`` (``token_key``: every call carries
an Ed25519-signed credential that the server verifies), ``screen`` (``screen_l2_max`` far above
every update: the norm is computed on each chunk, nothing is changed) and ``clip`` (a bound below
every update: each one is rescaled in its slot before folding), plus ``control``, a second server
exactly like ``base``: its row is the noise floor of this machine (an A/A comparison). A sample is ``--updates``
sequential pushes of one update (clock stops at the last acknowledgement; the round finishes
outside the clock), or ``--calls`` sequential GetRound calls. A last pair isolates the screen's
data-path cost: the gateway's per-chunk scan (``ChunkScan``, 2 MiB chunks) over one update in this
process, NaN/Inf check and norm in one pass ÷ the NaN/Inf check alone.

    python -m benchmarks.bench_security [--quick]
"""
from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

from lifl import tokens
from lifl.client import Client
from lifl.gateway import ChunkScan
from lifl.layout import Layout

from .common import Report, ServerProc, interleave, model_arrays, parser


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--updates", type=int, default=None, help="pushes per sample")
    p.add_argument("--calls", type=int, default=None, help="GetRound calls per sample")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 7)
    n_up = args.updates or (2 if args.quick else 4)
    n_calls = args.calls or (100 if args.quick else 300)

    arrays = model_arrays(args.model)
    layout = Layout.from_arrays(arrays)
    ids = itertools.count()
    keys = Path(tempfile.mkdtemp(prefix="lifl-bench-keys-"))
    tokens.keygen(keys / "issuer.pem", keys / "server.pub")
    signer = (keys / "issuer.pem").read_bytes()
    cfg = {"workers": 2, "leaves": 1}
    with ServerProc("lifl", **cfg) as base, ServerProc("lifl", token_key=str(keys / "server.pub"), **cfg) as signed, \
            ServerProc("lifl", screen_l2_max=1e30, **cfg) as screen, \
            ServerProc("lifl", screen_l2_max=1.0, screen_mode="clip", **cfg) as clip, ServerProc("lifl", **cfg) as control:
        op = tokens.issue(signer, "bench-operator", "*", "operator", ttl_s=86400)
        admins = {"base": Client(base.address), "signed": Client(signed.address, token=op),
                  "screen": Client(screen.address), "clip": Client(clip.address), "control": Client(control.address)}

        def push_case(which):
            admin = admins[which]

            def run():
                rid = admin.open_round(layout=layout, expected=n_up)
                cids = [f"c{next(ids)}" for _ in range(n_up)]
                creds = [tokens.issue(signer, c, "default", ttl_s=3600) if which == "signed" else None for c in cids]
                clients = [Client(admin_address[which], token=t) for t in creds]
                t0 = time.perf_counter()
                for cl, cid in zip(clients, cids):
                    cl.push(rid, arrays, num_examples=10, client_id=cid)
                dt = time.perf_counter() - t0
                admin.pull(rid, wait_s=120)
                for cl in clients:
                    cl.close()
                return dt
            return run

        admin_address = {"base": base.address, "signed": signed.address, "screen": screen.address,
                         "clip": clip.address, "control": control.address}
        rids = {w: admins[w].open_round(layout=layout, expected=1) for w in ("base", "signed")}

        def calls_case(which):
            admin, rid = admins[which], rids[which]

            def run():
                t0 = time.perf_counter()
                for _ in range(n_calls):
                    admin.round_info(rid)
                return (time.perf_counter() - t0) / n_calls * 1e6
            return run

        buf = bytearray(layout.total_size)
        layout.pack_into(arrays, buf)

        def scan_case(squares):
            def run():
                scan = ChunkScan(layout, buf, True, squares)
                t0 = time.perf_counter()
                for a in range(0, layout.total_size, 2**21):
                    scan(a, min(a + 2**21, layout.total_size))
                return (time.perf_counter() - t0) * 1e3
            return run

        cases = [("scan_check", scan_case(False)), ("scan_norm", scan_case(True)),
                 ("push_base", push_case("base")), ("push_signed", push_case("signed")),
                 ("push_screen", push_case("screen")), ("push_clip", push_case("clip")),
                 ("push_control", push_case("control")),
                 ("call_base", calls_case("base")), ("call_signed", calls_case("signed"))]
        print(f"bench_security: {args.model} ({layout.describe()}), {n_up} pushes or {n_calls} calls per sample, "
              f"{reps} reps", flush=True)
        s = interleave(cases, reps)
        for cl in admins.values():
            cl.close()

    gibs = {k: [n_up * layout.total_size / t / 2**30 for t in v] for k, v in s.items() if k.startswith("push")}
    rep = Report("bench_security", "what trust costs: each ÷ the same server without it (interleaved)",
                 {"model": f"{args.model}: {layout.describe()}", "pushes per sample": n_up,
                  "calls per sample": n_calls, "transport": "grpcio, plaintext, loopback; one call at a time",
                  "servers": "own processes, workers=2, leaves=1, reject_nonfinite=on", "reps (interleaved)": reps,
                  "quick": args.quick})
    rep.add("push", "signed credential: ingest GiB/s ÷ none", gibs["push_signed"], gibs["push_base"], "GiB/s",
            ours_label="signed", peer_label="none")
    rep.add("push", "screen_l2_max (norm, no change): ingest GiB/s ÷ none", gibs["push_screen"], gibs["push_base"],
            "GiB/s", ours_label="norm", peer_label="none")
    rep.add("push", "screen_mode=clip (every update rescaled): ingest GiB/s ÷ none", gibs["push_clip"],
            gibs["push_base"], "GiB/s", ours_label="clip", peer_label="none")
    rep.add("push", "control: an identical second server: ingest GiB/s ÷ none (noise floor)", gibs["push_control"],
            gibs["push_base"], "GiB/s", ours_label="same", peer_label="none")
    rep.add("GetRound", "signed credential: µs per call ÷ none", s["call_signed"], s["call_base"], "µs",
            ours_label="signed", peer_label="none")
    rep.add("scan", "NaN/Inf check + L2 norm (one pass) ÷ NaN/Inf check: ms per update", s["scan_norm"],
            s["scan_check"], "ms", ours_label="check+norm", peer_label="check")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
