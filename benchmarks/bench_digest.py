"""The gateway's per-chunk copy + identical-retry digest: one pass (``rounds.Digest.update`` with a
destination: copy and 64-bit content hash in cache-sized blocks, C kernel) against what it
replaced, numpy's copy plus zlib's CRC-32 of the same chunk (two passes). One thread, 2 MiB
chunks of float32 data, from a pool of distinct buffers; interleaved, medians of per-rep ratios.

    python -m benchmarks.bench_digest [--quick] [--reps N]
"""
from __future__ import annotations

import os
import time
import zlib

import numpy as np

from lifl.content_hash import _foldc
from lifl.rounds import Digest

from .common import MiB, Report, interleave, parser


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--chunk-mib", type=int, default=2)
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    n_bufs, per_sample = 16, (32 if args.quick else 256)
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal(args.chunk_mib * MiB // 4).astype(np.float32).tobytes() for _ in range(n_bufs)]
    dst = np.empty(args.chunk_mib * MiB, np.uint8)

    def one_pass():
        d = Digest(1.0, 0)
        t = time.perf_counter()
        for i in range(per_sample):
            d.update(chunks[i % n_bufs], dst)
        return per_sample * len(chunks[0]) / (time.perf_counter() - t) / 2**30

    def two_passes():
        crc = 0
        t = time.perf_counter()
        for i in range(per_sample):
            c = chunks[i % n_bufs]
            np.copyto(dst, np.frombuffer(c, np.uint8))
            crc = zlib.crc32(c, crc)
        return per_sample * len(chunks[0]) / (time.perf_counter() - t) / 2**30

    s = interleave([("one pass", one_pass), ("copy + crc32", two_passes)], reps)
    rep = Report("bench_digest", "Chunk copy + identical-retry digest (higher is better)",
                 {"chunk": f"{args.chunk_mib} MiB float32", "chunks per sample": per_sample,
                  "C kernel": _foldc is not None, "cpus": os.cpu_count(), "reps (interleaved)": reps})
    rep.add("copy + digest of every received byte", "GiB/s ratio", s["one pass"], s["copy + crc32"], "GiB/s",
            ours_label="copy_hash", peer_label="np.copyto + zlib.crc32")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
