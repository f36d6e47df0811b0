"""Matched-round table from log.txt of the cut-off confirming run (the bench was stopped by its time limit
before most jobs finished; log.txt holds every evaluation each job reached).  Usage: python partial_from_log.py"""
import collections
import re
from pathlib import Path

import numpy as np

RX = re.compile(r"\[(\w+) seed=(\d)\] round\s+(\d+): AP mean ([\d.]+) var ([\d.]+) worst ([\d.]+) unseen ([\d.]+)")
runs = collections.defaultdict(dict)
for line in (Path(__file__).parent / "log.txt").read_text().splitlines():
    m = RX.search(line)
    if m:
        runs[(m.group(1), int(m.group(2)))][int(m.group(3))] = [float(x) for x in m.groups()[3:]]


def ms(xs, scale):
    a = np.asarray(xs) * scale
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def table(rnd, methods=("fedavg", "isp", "isp_swad", "heteroswitch")):
    out = [f"#### round {rnd}", "", "| method | seeds | mean AP | var AP (x1e4) | worst AP | unseen (G4) AP |", "|---|---|---|---|---|---|"]
    for m in methods:
        seeds = sorted(s for (mm, s), h in runs.items() if mm == m and rnd in h)
        if not seeds:
            continue
        v = np.array([runs[(m, s)][rnd] for s in seeds])
        out.append(f"| {m} | {','.join(map(str, seeds))} | {ms(v[:, 0], 100)} | {ms(v[:, 1], 1e4)} | "
                   f"{ms(v[:, 2], 100)} | {ms(v[:, 3], 100)} |")
    return "\n".join(out) + "\n"


def paired(method="heteroswitch", base="fedavg"):
    """Per seed and round, method vs base: variance reduction %, mean/worst/unseen AP deltas (points)."""
    out = [f"#### {method} vs {base}, same seed and round", "",
           "| round | seed | var reduction | mean AP Δ | worst AP Δ | unseen AP Δ |", "|---|---|---|---|---|---|"]
    for (m, s), h in sorted(runs.items(), key=lambda kv: kv[0][1]):
        if m != method or (base, s) not in runs:
            continue
        for r in sorted(set(h) & set(runs[(base, s)])):
            f, x = runs[(base, s)][r], h[r]
            out.append(f"| {r} | {s} | {100 * (1 - x[1] / f[1]):.0f} % | {100 * (x[0] - f[0]):+.2f} | "
                       f"{100 * (x[2] - f[2]):+.2f} | {100 * (x[3] - f[3]):+.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print("\n".join(table(r) for r in (20, 25, 29)))
    print(paired())
    print("Last evaluation each job reached:", {f"{m}/s{s}": max(h) for (m, s), h in sorted(runs.items())})
