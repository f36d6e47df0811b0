"""Compressed update encodings vs float32 RAW, in one run: fold throughput, gateway ingest,
client-side encoding cost, bytes per slot, and a modelled round on a 100 Mbit/s client link
(issue 17 part 2).

* fold: ``lifl.fold.fold_updates`` of ``--per-sample`` updates (ResNet-18 layout) held in slots as
  the gateway leaves them (encoded bytes + trailer), ``--fuse`` per call, from a pool of distinct
  buffers, into one float64 accumulator; one thread. Throughput is given per *logical* byte (the
  float32 size of the update: the work done) and per *slot* byte (what is read).
* ingest: one client pushes pre-encoded updates (``Client.push_raw``: header + chunks built
  outside the clock) to a LIFL server in its own process; the clock stops at the last
  acknowledgement (the update is in its slot); the round is finished outside the clock.
* encode: ``Client.push``'s encoder (``lifl.encoding.encode_pieces`` + chunking) on the client.
* round model: per update, client encode + wire bytes at 100 Mbit/s + the server's measured
  ingest and fold seconds; the ratio to RAW is what a bandwidth-bound client sees.

All cases are interleaved (RAW, FLOAT16, BFLOAT16, INT8, RAW, ...); ratios are medians of the
per-repetition ratios to RAW, with raw medians beside them.

    python -m benchmarks.bench_encodings [--quick] [--reps N]
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from lifl import encoding
from lifl.client import Client
from lifl.fold import UpdateViews, fold_updates, have_c_kernel
from lifl.layout import Layout
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk

from .common import MiB, Report, ServerProc, interleave, model_arrays, parser, perturbed

NAMES = ("raw", "float16", "bfloat16", "int8")
LINK_BPS = 100e6


def slot(enc: encoding.EncodedLayout, arrays) -> np.ndarray:
    """A slot as the gateway leaves it: the encoded bytes, then the trailer."""
    buf = np.zeros(enc.slot_size, np.uint8)
    for off, piece in encoding.encode_pieces(enc, arrays):
        buf[off:off + len(piece)] = np.frombuffer(piece, np.uint8)
    encoding.write_trailer(enc, memoryview(buf))
    return buf


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--pool", type=int, default=None, help="distinct update buffers per encoding")
    p.add_argument("--per-sample", type=int, default=16, help="updates folded per timed sample")
    p.add_argument("--fuse", type=int, default=8, help="updates per fold call")
    p.add_argument("--pushes", type=int, default=None, help="pushes per ingest sample")
    p.add_argument("--chunks", default="2", help="push chunk sizes in MiB (the first is the reference)")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 7)
    pool_n = args.pool or (4 if args.quick else 8)
    n_push = args.pushes or (2 if args.quick else 4)
    per, fuse = args.per_sample, args.fuse
    chunk_mib = [float(c) for c in args.chunks.split(",")]
    ref_c = chunk_mib[0]

    base = model_arrays(args.model)
    layout = Layout.from_arrays(base)
    encs = {nm: encoding.encoded(layout, encoding.parse(nm)) for nm in NAMES}
    updates = [perturbed(base, i) for i in range(pool_n)]
    slots = {nm: [slot(encs[nm], u) for u in updates] for nm in NAMES}
    views = {nm: [UpdateViews(layout, s) for s in slots[nm]] for nm in NAMES}
    weights = [float(w) for w in np.random.default_rng(1).uniform(1, 100, pool_n)]
    acc = np.zeros(layout.numel)
    cursor = itertools.count()

    def fold_case(nm):
        def run():
            t0 = time.perf_counter()
            for _ in range(per // fuse):
                idx = [next(cursor) % pool_n for _ in range(fuse)]
                fold_updates(acc, layout, [views[nm][j] for j in idx], [weights[j] for j in idx])
            return time.perf_counter() - t0
        return run

    def encode_case(nm):
        def run():
            t0 = time.perf_counter()
            pieces = encoding.encode_pieces(encs[nm], updates[next(cursor) % pool_n])
            for _ in encoding.chunks(encs[nm], pieces, 2 * MiB):
                pass
            return time.perf_counter() - t0
        return run

    # pre-encoded push streams (chunks built once, outside the clock)
    wire = {(nm, c): [bytes(encode_chunk(piece)) for piece in encoding.chunks(
        encs[nm], encoding.encode_pieces(encs[nm], updates[0]), int(c * MiB))] for nm in NAMES for c in chunk_mib}
    ids = itertools.count()
    print(f"bench_encodings: {args.model} ({layout.describe()}), fold {per} updates per sample (fuse {fuse}) from "
          f"{pool_n} buffers per encoding, {n_push} pushes per ingest sample, chunks {chunk_mib} MiB, {reps} reps, C kernel: "
          f"{have_c_kernel()}", flush=True)
    with ServerProc("lifl") as srv:
        admin, cl = Client(srv.address), Client(srv.address)

        def ingest_case(nm, c):
            def run():
                rid = admin.open_round(layout=layout, expected=n_push)
                t0 = time.perf_counter()
                for _ in range(n_push):
                    h = pb.PushHeader(round=rid, client_id=f"c{next(ids)}", num_examples=1.0,
                                      total_size=encs[nm].total_size, encoding=int(encs[nm].encoding))
                    layout.to_proto(h.tensors)
                    cl.push_raw(iter([pb.PushRequest(header=h).SerializeToString(), *wire[(nm, c)]]))
                dt = time.perf_counter() - t0
                admin.pull(rid, wait_s=120)
                return dt
            return run

        cases = []
        for nm in NAMES:
            cases += [(f"fold-{nm}", fold_case(nm)), (f"encode-{nm}", encode_case(nm))]
            cases += [(f"ingest-{nm}" + ("" if c == ref_c else f"-{c}"), ingest_case(nm, c)) for c in chunk_mib]
        s = interleave(cases, reps)
        admin.close()
        cl.close()

    logical = layout.total_size
    rep = Report("bench_encodings", "Update encodings vs float32 RAW, same run (ratios: encoding ÷ RAW)",
                 {"model": f"{args.model}: {layout.describe()}",
                  "bytes per update (wire / slot)": ", ".join(
                      f"{nm} {encs[nm].total_size / MiB:.2f} / {encs[nm].slot_size / MiB:.2f} MiB" for nm in NAMES),
                  "fold": f"{per} updates per sample, fuse {fuse}, {pool_n} distinct buffers per encoding, one thread",
                  "ingest": f"{n_push} pre-encoded pushes per sample in {ref_c:g} MiB chunks, one client stream, "
                            "loopback, server in its own process with defaults (reject_nonfinite on)",
                  "reps (interleaved)": reps, "C kernel": have_c_kernel(), "quick": args.quick})
    fold_gbs = {nm: [per * logical / t / 1e9 for t in s[f"fold-{nm}"]] for nm in NAMES}
    slot_gbs = {nm: [per * encs[nm].slot_size / t / 1e9 for t in s[f"fold-{nm}"]] for nm in NAMES}
    ingest_ups = {nm: [n_push / t for t in s[f"ingest-{nm}"]] for nm in NAMES}
    ingest_gib = {nm: [n_push * logical / t / 2**30 for t in s[f"ingest-{nm}"]] for nm in NAMES}
    wire_gib = {nm: [n_push * encs[nm].total_size / t / 2**30 for t in s[f"ingest-{nm}"]] for nm in NAMES}
    for nm in NAMES[1:]:
        rep.add(nm, "fold GB/s per logical (float32) byte ÷ RAW", fold_gbs[nm], fold_gbs["raw"], "GB/s",
                goal=">= 1.0" if nm == "int8" else "", better="higher", threshold=1.0 if nm == "int8" else None,
                ours_label=nm, peer_label="raw")
        rep.add(nm, "fold GB/s per slot byte read ÷ RAW", slot_gbs[nm], slot_gbs["raw"], "GB/s",
                ours_label=nm, peer_label="raw")
    for nm in NAMES[1:]:
        rep.add(nm, "ingest updates/s ÷ RAW", ingest_ups[nm], ingest_ups["raw"], "updates/s",
                ours_label=nm, peer_label="raw")
        rep.add(nm, "ingest logical GiB/s ÷ RAW", ingest_gib[nm], ingest_gib["raw"], "GiB/s",
                ours_label=nm, peer_label="raw")
        rep.add(nm, "ingest wire GiB/s ÷ RAW", wire_gib[nm], wire_gib["raw"], "GiB/s",
                ours_label=nm, peer_label="raw")
    for nm in NAMES[1:]:
        one = [encs[nm].total_size] * reps
        rep.add(nm, "wire bytes per update ÷ RAW", one, [logical] * reps, "MB", goal="<= 0.27" if nm == "int8" else "",
                better="lower", threshold=0.27 if nm == "int8" else None, ours_label=nm, peer_label="raw", scale=1e-6)
        rep.add(nm, "slot bytes per update ÷ RAW", [encs[nm].slot_size] * reps, [encs["raw"].slot_size] * reps, "MB",
                ours_label=nm, peer_label="raw", scale=1e-6)

    def round_s(nm):   # per update: client encode + 100 Mbit/s link + server ingest + fold, per repetition
        return [e + encs[nm].total_size * 8 / LINK_BPS + i / n_push + f / per
                for e, i, f in zip(s[f"encode-{nm}"], s[f"ingest-{nm}"], s[f"fold-{nm}"])]
    for nm in NAMES[1:]:
        rep.add(nm, "modelled round time per update at 100 Mbit/s ÷ RAW", round_s(nm), round_s("raw"), "s",
                goal="<= 0.3" if nm == "int8" else "", better="lower", threshold=0.3 if nm == "int8" else None,
                ours_label=nm, peer_label="raw")
    for c in chunk_mib[1:]:
        for nm in NAMES:
            ups = [n_push / t for t in s[f"ingest-{nm}-{c}"]]
            rep.add(f"{nm} {c:g} MiB", f"ingest updates/s ÷ {ref_c:g} MiB chunks", ups, ingest_ups[nm], "updates/s",
                    ours_label=f"{c:g} MiB", peer_label=f"{ref_c:g} MiB")
    rep.add("raw", "client encode s per update (RAW: chunking only)", s["encode-raw"], s["encode-raw"], "s",
            ours_label="raw", peer_label="raw")
    for nm in NAMES[1:]:
        rep.add(nm, "client encode s per update ÷ RAW chunking", s[f"encode-{nm}"], s["encode-raw"], "s",
                ours_label=nm, peer_label="raw")
    rep.notes.append("logical bytes = the update's float32 flat layout; slot bytes = encoded bytes + 64-byte trailer")
    rep.notes.append("the round model charges every update its own link time (clients on their own 100 Mbit/s "
                     "links, one after another would be the same ratio); server times are this machine's")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
