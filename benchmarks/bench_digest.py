"""The gateway's per-chunk work: copy into the slot, identical-retry digest and NaN/Inf check in
one pass (``rounds.Digest.update`` with a slot and ``ElementChecks``: the C kernel's ``ingest``,
16 KiB blocks, its AVX-512 loop where the CPU has one) against the same pass with the kernel's
portable loop, against the two passes it replaced (copy + hash, then a NaN/Inf scan of the landed
chunk), against numpy's copy plus zlib's CRC-32 plus the scan, and beside the copy alone (the
ceiling: what a gateway that only copied would pay). One thread,
2 MiB chunks of float32 data from a pool of distinct buffers, written into a 64 MiB slot (as a
gateway fills many slots, the destination is not in cache); interleaved, medians of per-rep ratios.

    python -m benchmarks.bench_digest [--quick] [--reps N]
"""
from __future__ import annotations

import os
import time
import zlib

import numpy as np

from lifl.content_hash import _foldc
from lifl.encoding import Encoding, encoded
from lifl.fold import nonfinite_in
from lifl.layout import Layout
from lifl.rounds import Digest

from .common import MiB, Report, interleave, parser


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--chunk-mib", type=int, default=2)
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    n_bufs, per_sample, per_slot = 16, (32 if args.quick else 256), 32
    size = args.chunk_mib * MiB
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal(size // 4).astype(np.float32).tobytes() for _ in range(n_bufs)]
    enc = encoded(Layout.from_arrays({"w": np.zeros(per_slot * size // 4, np.float32)}), Encoding.RAW)
    checks = enc.element_checks(nonfinite=True)
    slot = np.ones(enc.total_size, np.uint8)   # touched: no page faults in the timings

    def timed(step):
        def run():
            d = None
            t = time.perf_counter()
            for i in range(per_sample):
                if i % per_slot == 0:
                    d = Digest(1.0, 0)
                step(d, chunks[i % n_bufs], (i % per_slot) * size)
            return per_sample * size / (time.perf_counter() - t) / 2**30
        return run

    def one_pass(d, c, pos):
        if d.update(c, slot, checks)[0] >= 0:
            raise AssertionError("finite data refused")

    def portable(d, c, pos):
        _foldc.use_simd(False)
        try:
            one_pass(d, c, pos)
        finally:
            _foldc.use_simd(True)

    def copy_only(d, c, pos):
        np.copyto(slot[pos:pos + size], np.frombuffer(c, np.uint8))

    def two_passes(d, c, pos):   # the gateway before: copy + hash, then a scan of the landed bytes
        d.update(c, slot)
        if nonfinite_in(slot[pos:pos + size].view(np.float32), 0):
            raise AssertionError("finite data refused")

    def crc(d, c, pos):          # before the content hash: numpy's copy, zlib's CRC-32, the scan
        np.copyto(slot[pos:pos + size], np.frombuffer(c, np.uint8))
        zlib.crc32(c)
        if nonfinite_in(slot[pos:pos + size].view(np.float32), 0):
            raise AssertionError("finite data refused")

    simd = _foldc is not None and _foldc.use_simd(True)
    cases = [("one pass", timed(one_pass)), ("two passes", timed(two_passes)), ("crc", timed(crc)),
             ("copy", timed(copy_only))] + ([("portable", timed(portable))] if simd else [])
    s = interleave(cases, reps)
    rep = Report("bench_digest", "A received chunk's copy + digest + NaN/Inf check (higher is better)",
                 {"chunk": f"{args.chunk_mib} MiB float32", "chunks per sample": per_sample,
                  "slot": f"{per_slot * size // MiB} MiB", "C kernel": _foldc is not None, "cpus": os.cpu_count(),
                  "AVX-512 loop": simd, "reps (interleaved)": reps})
    if simd:
        rep.add("copy + digest + check of every received byte", "GiB/s ratio", s["one pass"], s["portable"], "GiB/s",
                ours_label="one pass", peer_label="portable loop")
    rep.add("copy + digest + check of every received byte", "GiB/s ratio", s["one pass"], s["two passes"], "GiB/s",
            ours_label="one pass", peer_label="copy+hash, then scan")
    rep.add("copy + digest + check of every received byte", "GiB/s ratio", s["one pass"], s["crc"], "GiB/s",
            ours_label="one pass", peer_label="np.copyto + crc32 + scan")
    rep.add("copy + digest + check of every received byte", "diagnostic: GiB/s ratio to the copy alone",
            s["one pass"], s["copy"], "GiB/s", ours_label="one pass", peer_label="np.copyto only")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
