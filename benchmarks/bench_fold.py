"""Fold throughput per core ÷ numpy copy bandwidth of the same bytes (issue 2, goal >= 1.0).

Each sample folds the same number of float32 client updates (ResNet-18 layout,
distinct buffers cycled from a pool larger than the last-level cache) into one
float64 accumulator with ``lifl.fold.fold_updates``, ``fuse`` updates per call
(1, 4, 8, 16: the number of pending updates a leaf folds in one pass over
cache-sized blocks). The peer is ``np.copyto`` of the same update bytes into a
model-sized buffer, and for reference the naive per-tensor ``acc += w * x``.
All cases run interleaved on one thread; throughput = update bytes / second.

    python -m benchmarks.bench_fold [--quick]
"""
from __future__ import annotations

import time

import numpy as np

from lifl.fold import UpdateViews, fold_updates, have_c_kernel
from lifl.layout import Layout

from .common import Report, interleave, model_arrays, parser, perturbed

FUSES = (1, 4, 8, 16)


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--pool", type=int, default=None, help="distinct update buffers cycled through")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 9)
    pool_n = args.pool or (16 if args.quick else 32)
    per_sample = 16  # updates folded (or copied) per timed sample, whatever the fuse

    base = model_arrays(args.model)
    layout = Layout.from_arrays(base)
    size = layout.total_size
    bufs = []
    for i in range(pool_n):
        b = np.empty(size, np.uint8)
        layout.pack_into(perturbed(base, i), b)
        bufs.append(b)
    views = [UpdateViews(layout, b) for b in bufs]
    rng = np.random.default_rng(1)
    weights = [float(w) for w in rng.uniform(1, 100, pool_n)]
    acc = np.zeros(layout.numel, np.float64)
    dst = np.empty(size, np.uint8)
    state = {"i": 0}

    def take(k):
        i = state["i"]
        state["i"] = (i + k) % pool_n
        return [(i + j) % pool_n for j in range(k)]

    def copy_case():
        t0 = time.perf_counter()
        for j in take(per_sample):
            np.copyto(dst, bufs[j])
        return time.perf_counter() - t0

    def fused(k):
        def run():
            t0 = time.perf_counter()
            for _ in range(per_sample // k):
                idx = take(k)
                fold_updates(acc, layout, [views[j] for j in idx], [weights[j] for j in idx])
            return time.perf_counter() - t0
        return run

    def naive():
        t0 = time.perf_counter()
        for j in take(per_sample):
            w = weights[j]
            for spec, e, x in zip(layout.specs, layout.elem_offsets, views[j].views):
                a = acc[e:e + spec.numel]
                a += w * x
        return time.perf_counter() - t0

    cases = [("copy", copy_case), ("naive", naive)] + [(f"fuse{k}", fused(k)) for k in FUSES]
    print(f"bench_fold: {args.model} ({layout.describe()}), {pool_n} distinct updates, "
          f"{per_sample} updates per sample, {reps} reps, C kernel: {have_c_kernel()}", flush=True)
    s = interleave(cases, reps)

    nbytes = per_sample * size
    gbs = {k: [nbytes / t / 1e9 for t in v] for k, v in s.items()}
    rep = Report("bench_fold", "Fold throughput per core ÷ numpy copy of the same bytes (higher is better)",
                 {"model": f"{args.model}: {layout.describe()}", "update dtype": "float32 (+ int64 BN counters)",
                  "accumulator": "float64", "updates per sample": per_sample,
                  "distinct update buffers": f"{pool_n} ({pool_n * size / 2**20:.0f} MiB)",
                  "reps (interleaved)": reps, "C kernel": have_c_kernel(), "quick": args.quick})
    for k in FUSES:
        rep.add(f"fuse={k}", "fold GB/s ÷ copy GB/s", gbs[f"fuse{k}"], gbs["copy"], "GB/s", goal=">= 1.0",
                better="higher", threshold=1.0, ours_label="fold", peer_label="copy")
    rep.add("naive acc += w*x", "fold GB/s ÷ copy GB/s", gbs["naive"], gbs["copy"], "GB/s", goal="(reference)",
            ours_label="naive", peer_label="copy")
    rep.notes.append("throughput counts update bytes (float32 in), not the float64 accumulator's traffic")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
