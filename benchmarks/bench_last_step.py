"""The round's last step: its last fold and the finalize as one pass (``fold.fold_and_finalize``)
÷ the same work as two commands (``fold.fold_in_place`` then ``fold.finalize``), in one process
on one core, interleaved. This is the part of post-arrival latency the engine's fusion removes
(issue 13: ResNet-18's last step moves ~360 MB as two passes, ~270 MB fused).

Two tree shapes: one leaf (its last pending updates, 1 and 4 of them) and the top of a tree
(the host's sum plus 3 children's partial sums).

    python -m benchmarks.bench_last_step [--quick]
"""
from __future__ import annotations

import time

import numpy as np

from lifl import fold
from lifl.layout import Layout

from .common import Report, interleave, model_arrays, parser, perturbed


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 9)
    base = model_arrays(args.model)
    layout = Layout.from_arrays(base)
    bufs = []
    for i in range(4):
        b = np.empty(layout.total_size, np.uint8)
        layout.pack_into(perturbed(base, i), b)
        bufs.append(fold.UpdateViews(layout, b))
    acc = np.random.default_rng(0).standard_normal(layout.numel) * 100
    kids = [np.random.default_rng(k).standard_normal(layout.numel) * 100 for k in (1, 2, 3)]
    journal = fold.Journal(bytearray(fold.journal_bytes(layout.numel)), layout.numel)
    out = bytearray(layout.total_size)
    gen = iter(range(2, 10**9, 2))

    def inputs(kind):
        if kind == "children":
            return fold.add_partials(kids)
        k = int(kind)
        return fold.add_updates(layout, bufs[:k], [float(w) for w in range(1, k + 1)])

    def case(kind, fused):
        def run():
            journal.gens[:] = g0 = next(gen)   # every piece at the base generation
            g1 = g0 + 1
            t0 = time.perf_counter()
            if fused:
                fold.fold_and_finalize(acc, journal, g1, g0, inputs(kind), layout, 1234.5, out)
            else:
                fold.fold_in_place(acc, journal, g1, g0, inputs(kind))
                fold.finalize(acc, layout, 1234.5, out)
            return time.perf_counter() - t0
        return run

    kinds = ("1", "4", "children")
    cases = [(f"{k}-{'fused' if f else 'split'}", case(k, f)) for k in kinds for f in (True, False)]
    print(f"bench_last_step: {args.model} ({layout.describe()}), {reps} reps, C kernel: {fold.have_c_kernel()}",
          flush=True)
    s = interleave(cases, reps)
    rep = Report("bench_last_step", "Last fold + finalize fused ÷ as two passes (lower is better)",
                 {"model": f"{args.model}: {layout.describe()}", "reps (interleaved)": reps,
                  "C kernel": fold.have_c_kernel(), "quick": args.quick})
    names = {"1": "one leaf, 1 last update", "4": "one leaf, 4 last updates", "children": "top, 3 children"}
    for k in kinds:
        rep.add(names[k], "seconds fused ÷ split", [x * 1e3 for x in s[f"{k}-fused"]],
                [x * 1e3 for x in s[f"{k}-split"]], "ms", goal="< 1", better="lower", threshold=1.0,
                ours_label="fused", peer_label="split")
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
