"""What one HeteroSwitch client-round costs, per remedy, measured alone.

Each variant trains the same client (same model, data, seed) for one round;
the variants run interleaved (A B C ... A B C ...), ``--reps`` times after a
warm-up, and the medians of the device-seconds per phase (CUDA events on a
GPU) and of the wall time are printed with their ratio to plain local SGD
(``none``) measured in the same run.  FLOPs come from the counted unit costs
(:mod:`heteroswitch.cost`) and do not vary between repetitions.

Variants: ``none`` (FedAvg), ``isp``, ``swad``, ``isp+swad`` (always on),
``probe`` (HeteroSwitch at level 0: only the bias probe), ``probe+colour+isp``
(a flagged client: bias probe, colour probe, then ISP) and
``probe+colour+swad`` (a flagged client choosing SWAD).

    python benchmarks/bench_heteroswitch_cost.py --device cuda --reps 7 --out client_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from heteroswitch.bias import BiasSwitch, Mode, SwitchConfig
from heteroswitch.models import make_model
from heteroswitch.swad import SWADConfig
from heteroswitch.trainer import TrainConfig, load_numpy_state, resolve_device, state_to_numpy, train_local

VARIANTS = {
    "none": Mode(False, False),
    "isp": Mode(True, False),
    "swad": Mode(False, True),
    "isp+swad": Mode(True, True),
    "probe": SwitchConfig(thresholds=(1e9, 2e9)),                                     # level 0
    "probe+colour+isp": SwitchConfig(thresholds=(-1e9, 1e9), colour_threshold=1e9),    # level 1, ISP kept
    "probe+colour+swad": SwitchConfig(thresholds=(-1e9, 1e9), colour_threshold=-0.99),  # level 1, ISP -> SWAD
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--blocks", default="1,1,1,1")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.reps < 5:
        ap.error("--reps must be >= 5 (medians of at least 5)")
    dev = resolve_device(a.device)
    model = make_model(12, a.width, tuple(int(b) for b in a.blocks.split(",")), seed=0).to(dev)
    init = state_to_numpy(model)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(a.samples, 3, a.image_size, a.image_size), dtype=np.uint8)
    y = rng.integers(0, 12, size=a.samples)
    cfg = TrainConfig(local_steps=a.local_steps, batch_size=a.batch_size, bias_eval_samples=a.samples,
                      swad=SWADConfig(eval_every=2, eval_samples=a.samples), device=str(dev))

    def one(v):
        load_numpy_state(model, init)
        spec = VARIANTS[v]
        t = time.perf_counter()
        if isinstance(spec, Mode):
            r = train_local(model, x, y, cfg, mode=spec, seed=1)
        else:
            r = train_local(model, x, y, cfg, switch=BiasSwitch(spec), server_ref=1.0, seed=1)
        wall = time.perf_counter() - t
        return {**{k: v for k, v in r.metrics.items() if k.startswith(("dev_s_", "flops_"))}, "wall_s": wall}

    for v in VARIANTS:  # warm-up (kernels, caches, the unit-cost count)
        one(v)
    raw: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(a.reps):
        for v in VARIANTS:
            raw[v].append(one(v))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in raw.items()}
    base = med["none"]
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"{a.reps} interleaved reps, medians; ratio = variant / none")
    print(f"{'variant':<18} {'dev s':>8} {'ratio':>6} {'wall s':>8} {'ratio':>6} {'GFLOP':>9} {'ratio':>6}  "
          "dev s per phase (sgd/probe/isp/swad_avg/swad_eval)")
    for v, m in med.items():
        ph = "/".join(f"{m[f'dev_s_{p}']:.4f}" for p in ("sgd", "probe", "isp", "swad_avg", "swad_eval"))
        print(f"{v:<18} {m['dev_s_total']:8.4f} {m['dev_s_total'] / base['dev_s_total']:6.2f} {m['wall_s']:8.4f} "
              f"{m['wall_s'] / base['wall_s']:6.2f} {m['flops_total'] / 1e9:9.2f} "
              f"{m['flops_total'] / base['flops_total']:6.3f}  {ph}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"device": str(dev), "torch": torch.__version__, "reps": a.reps, "args": vars(a),
                       "median": med, "raw": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
