"""Fold throughput per core ÷ numpy copy bandwidth of the same bytes (issue 2, goal >= 1.0).

Each sample folds the same number of float32 client updates (ResNet-18 layout,
distinct buffers cycled from a pool larger than the last-level cache) into one
float64 accumulator with ``lifl.fold.fold_updates``, ``fuse`` updates per call
(1, 4, 8, 16: the number of pending updates a leaf folds in one pass over
cache-sized blocks). The peer is ``np.copyto`` of the same update bytes into a
model-sized buffer, and for reference the naive per-tensor ``acc += w * x``.
All cases run interleaved on one thread; throughput = update bytes / second.

Beside them, the fold an aggregator function runs (``fold.fold_in_place``: in place, journaled
so that a function killed mid-fold is re-run exactly) ÷ the bare fold of the same updates: the
journal's cost. ``--ab ROOT``: the same journaled fold from another checkout (its package loaded
beside this one, its C kernel built), this tree ÷ that one.

    python -m benchmarks.bench_fold [--quick] [--ab /tmp/base]

``--processes 1,2,4,8,16``: scaling instead — that many processes (one per core, pinned),
each folding its own updates into its own accumulator (fuse 8) or copying them (the
memory ceiling), started together; throughput = all update bytes ÷ wall time, and each
count's ratio to one process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lifl.fold import UpdateViews, fold_updates, have_c_kernel
from lifl.layout import Layout

from .common import ROOT, Report, interleave, model_arrays, parser, perturbed

FUSES = (1, 4, 8, 16)


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        return _worker()
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--pool", type=int, default=None, help="distinct update buffers cycled through")
    p.add_argument("--processes", default="", help="scaling: process counts, e.g. 1,2,4,8,16")
    p.add_argument("--ab", default="", help="another checkout: its journaled fold as a case too")
    args = p.parse_args(argv)
    if args.processes:
        return scaling(args)
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

    def journaled(k, fold_mod, views_of):
        """``fold_mod.fold_in_place`` from generation g to g + 1, as a function runs it."""
        j = fold_mod.Journal(bytearray(fold_mod.journal_bytes(layout.numel)), layout.numel)
        own = np.zeros(layout.numel, np.float64)
        gen = {"g": 1}
        fold_mod.fold_in_place(own, j, 1, None, fold_mod.add_updates(layout, views_of[:1], weights[:1]))

        def run():
            t0 = time.perf_counter()
            for _ in range(per_sample // k):
                idx = take(k)
                add = fold_mod.add_updates(layout, [views_of[j] for j in idx], [weights[j] for j in idx])
                fold_mod.fold_in_place(own, j, gen["g"] + 1, gen["g"], add)
                gen["g"] += 1
            return time.perf_counter() - t0
        return run

    from lifl import fold as this_fold
    cases = [("copy", copy_case), ("naive", naive)] + [(f"fuse{k}", fused(k)) for k in FUSES]
    cases += [(f"journaled{k}", journaled(k, this_fold, views)) for k in (1, 4)]
    other = _load_other(args.ab) if args.ab else None
    if other is not None:
        other_views = [other.UpdateViews(layout, b) for b in bufs]
        cases += [(f"ab{k}", journaled(k, other, other_views)) for k in (1, 4)]
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
    for k in (1, 4):
        rep.add(f"fuse={k}", "journaled fold ÷ bare fold (GB/s)", gbs[f"journaled{k}"], gbs[f"fuse{k}"], "GB/s",
                ours_label="fold_in_place", peer_label="fold_updates")
    if other is not None:
        for k in (1, 4):
            rep.add(f"fuse={k}", f"journaled fold: this tree ÷ {args.ab}", gbs[f"journaled{k}"], gbs[f"ab{k}"], "GB/s",
                    ours_label="this tree", peer_label="other")
    rep.notes.append("throughput counts update bytes (float32 in), not the float64 accumulator's traffic")
    rep.print()
    rep.write(args.out)


def _load_other(root: str):
    """``lifl.fold`` of another checkout, imported as package ``lifl_ab`` beside this tree's."""
    import importlib.util
    pkg = Path(root).resolve() / "lifl"
    spec = importlib.util.spec_from_file_location("lifl_ab", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lifl_ab"] = mod
    spec.loader.exec_module(mod)
    other = importlib.import_module("lifl_ab.fold")
    if not other.have_c_kernel():
        raise SystemExit(f"{root}: build its C kernel first (python setup.py build_ext --inplace)")
    return other


# -- scaling over processes --------------------------------------------------------------------------
def _worker() -> None:
    """One folding process: ``{"core", "model", "pool", "per_sample"}``, then ``fold``/``copy`` lines,
    each answered with ``done`` once that many updates are folded (copied)."""
    spec = json.loads(sys.stdin.readline())
    os.sched_setaffinity(0, {spec["core"]})
    base = model_arrays(spec["model"])
    layout = Layout.from_arrays(base)
    bufs = []
    for i in range(spec["pool"]):
        b = np.empty(layout.total_size, np.uint8)
        layout.pack_into(perturbed(base, i + 100 * spec["core"]), b)
        bufs.append(b)
    views = [UpdateViews(layout, b) for b in bufs]
    acc = np.zeros(layout.numel, np.float64)
    dst = np.empty(layout.total_size, np.uint8)
    fold_updates(acc, layout, views[:8], [1.0] * min(8, len(views)))   # warm: pages faulted in
    dst[:] = bufs[0]
    print("ready", flush=True)
    i, k = 0, 8
    for line in sys.stdin:
        for _ in range(spec["per_sample"] // k):
            idx = [(i + j) % len(bufs) for j in range(k)]
            i = (i + k) % len(bufs)
            if line.strip() == "fold":
                fold_updates(acc, layout, [views[j] for j in idx], [1.5] * k)
            else:
                for j in idx:
                    np.copyto(dst, bufs[j])
        print("done", flush=True)


def scaling(args) -> None:
    counts = [int(c) for c in args.processes.split(",")]
    cores = sorted(os.sched_getaffinity(0))
    reps = args.reps or (3 if args.quick else 5)
    pool_n, per_sample = args.pool or 8, 16
    layout = Layout.from_arrays(model_arrays(args.model))
    procs = []
    for core in cores[:max(counts)]:
        pr = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_fold", "--worker"], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        pr.stdin.write(json.dumps({"core": core, "model": args.model, "pool": pool_n,
                                   "per_sample": per_sample}) + "\n")
        pr.stdin.flush()
        procs.append(pr)
    for pr in procs:
        assert pr.stdout.readline().strip() == "ready"

    def case(n, what):
        def run():
            t0 = time.perf_counter()
            for pr in procs[:n]:
                pr.stdin.write(what + "\n")
                pr.stdin.flush()
            for pr in procs[:n]:
                assert pr.stdout.readline().strip() == "done"
            return time.perf_counter() - t0
        return run

    cases = [(f"{w}{n}", case(n, w)) for n in counts for w in ("fold", "copy")]
    print(f"bench_fold scaling: {args.model} ({layout.describe()}), processes {counts} on cores {cores}, "
          f"{pool_n} updates each, {per_sample} per sample per process, {reps} reps", flush=True)
    try:
        s = interleave(cases, reps)
    finally:
        for pr in procs:
            pr.stdin.close()
            pr.wait(30)
    gbs = {k: [int(k[4:]) * per_sample * layout.total_size / t / 1e9 for t in v] for k, v in s.items()}
    rep = Report("bench_fold_scaling", "Fold throughput over processes ÷ one process; numpy copy beside "
                 "(higher is better)", {"model": f"{args.model}: {layout.describe()}", "fuse": 8,
                                        "accumulator": "float64, one per process", "C kernel": have_c_kernel(),
                                        "updates per process": f"{pool_n} distinct, {per_sample} per sample",
                                        "cores": len(cores), "reps (interleaved)": reps})
    one = counts[0]
    for n in counts[1:]:
        goal = dict(goal=">= 8", better="higher", threshold=8.0) if n == 16 else {}
        rep.add(f"{n} processes", f"fold GB/s ÷ {one} process", gbs[f"fold{n}"], gbs[f"fold{one}"], "GB/s",
                ours_label=f"fold x{n}", peer_label=f"fold x{one}", **goal)
        rep.add(f"{n} processes", f"copy GB/s ÷ {one} process (the ceiling's scaling)", gbs[f"copy{n}"],
                gbs[f"copy{one}"], "GB/s", ours_label=f"copy x{n}", peer_label=f"copy x{one}")
    for n in counts:
        rep.add(f"{n} processes", "fold GB/s ÷ copy GB/s", gbs[f"fold{n}"], gbs[f"copy{n}"], "GB/s",
                ours_label="fold", peer_label="copy")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
