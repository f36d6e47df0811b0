"""Pick a HeteroSwitch variant on the validation seed only (the rule is fixed before any result is seen).

Reads OUT/v*/job_heteroswitch_s<SEED>.json and prints, per variant, the tail (last 5 rounds) per-device AP
over the *seen* devices: mean, worst, and their sum; the chosen variant has the highest sum.  The other
seeds' results are never read here.

    python benchmarks/heteroswitch_select_variant.py OUTDIR 100
"""
import json
import sys
from pathlib import Path

import numpy as np


def main(out: str, seed: int) -> int:
    rows = []
    for d in sorted(Path(out).glob("v*/")):
        f = d / f"job_heteroswitch_s{seed}.json"
        if not f.is_file():
            print(f"{d.name}: no seed-{seed} job (did not finish)")
            continue
        job = json.loads(f.read_text())
        hist = job["history"]
        last = hist[-1]["round"]
        tail = [h for h in hist if h["round"] > last - job.get("tail_rounds", 5)]
        unseen = json.loads((d / "config.json").read_text())["data"]["unseen_device"]
        ap = {k: np.mean([h["per_device_ap"][k] for h in tail]) for k in tail[0]["per_device_ap"] if k != unseen}
        m, w = float(np.mean(list(ap.values()))), float(min(ap.values()))
        rows.append((100 * (m + w), d.name, 100 * m, 100 * w))
        print(f"{d.name}: seen-device tail mean AP {100 * m:.2f}, worst {100 * w:.2f}, sum {100 * (m + w):.2f}")
    if not rows:
        return 1
    print(f"chosen on seed {seed}: {max(rows)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
