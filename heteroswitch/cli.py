"""Console entry point: ``heteroswitch bench ...`` (also ``python -m heteroswitch bench ...``).

Presets fix a consistent size; individual flags override them:

* ``tiny``  -- CI smoke size (seconds on a CPU): checks the pipeline end to end.
* ``cpu``   -- a small but meaningful run on a laptop-class CPU (tens of minutes).
* ``gpu``   -- the reported size: 64x64 images, ResNet-style model, 60 rounds.

Benchmarks (``--benchmark``) fix what the data is, independent of its size:

* ``rev2``     -- revision 2: vendor colour casts, colour a shortcut (not identity).
* ``tradeoff`` -- the trade-off benchmark: six pairs of classes told apart by
  true colour alone (hues 9 degrees apart), and devices whose biases differ in kind (Samsung colour
  cast, LG noise and JPEG, Google resolution and sharpening; strength by tier),
  profiles in ``datasets/devices/tradeoff``.  Always-on ISP destroys signal on
  well-calibrated phones here.  Its switch defaults (thresholds 0.05, 0.5; colour
  threshold 0.2) were chosen on validation seed 100.  ``tradeoff-easy``: four pairs,
  hues 25 degrees apart (saturates).
* ``--flair FILE`` trains on a FLAIR HDF5 file instead (see :mod:`heteroswitch.flair_bench`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from pathlib import Path

from .bench import METHODS, BenchConfig, report_from_jobs, run_bench
from .bench.presets import BENCHMARKS, PRESETS, parse_scene_overrides
from .bias import SwitchConfig
from .devices import list_devices
from .flair_bench import FlairConfig
from .scenes import FederatedConfig, SceneConfig
from .swad import SWADConfig
from .trainer import TrainConfig

__all__ = ["BENCHMARKS", "PRESETS", "build_parser", "config_from_args", "main", "parse_scene_overrides"]

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="heteroswitch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the device-heterogeneity benchmark")
    b.add_argument("--preset", choices=list(PRESETS), default="tiny")
    b.add_argument("--benchmark", choices=list(BENCHMARKS), default="rev2",
                   help="which synthetic data: rev2 (default), tradeoff (colour-identity classes, kinds of bias; "
                        "the reported one) or tradeoff-easy")
    b.add_argument("--flair", default=None, metavar="HDF5",
                   help="train on this FLAIR HDF5 file (FLAIR's layout, multi-label) instead of synthetic scenes")
    b.add_argument("--device-map", default=None, metavar="JSON",
                   help="FLAIR: {user_id: device} JSON (default: the data card's deterministic hash map)")
    b.add_argument("--flair-test-images", type=int, default=1000,
                   help="FLAIR: test images pooled from the test partition (shot through every device)")
    b.add_argument("--flair-no-render", action="store_true",
                   help="FLAIR: keep the photos as they are (per-device test = that device's users' photos)")
    b.add_argument("--scene", default="", metavar="K=V,...",
                   help="override SceneConfig fields, e.g. colour_pairs=6,pair_hue_delta=0.04,pair_saturation=0.4:0.95")
    b.add_argument("--colour-threshold", type=_float_or_off, default=None,
                   help="per-client choice: a flagged client gets SWAD instead of ISP when ISP raises the "
                        "received model's loss on its data by more than this (relative); default off "
                        "(the tradeoff benchmarks set it; 'off' turns it off)")
    b.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    b.add_argument("--seeds", default="0,1,2", help="comma list of integer seeds (>= 3 for the reported table)")
    b.add_argument("--rounds", type=int)
    b.add_argument("--clients-per-round", type=int)
    b.add_argument("--eval-every", type=int)
    b.add_argument("--num-clients", type=int)
    b.add_argument("--samples-per-client", type=int)
    b.add_argument("--image-size", type=int)
    b.add_argument("--local-steps", type=int)
    b.add_argument("--batch-size", type=int)
    b.add_argument("--lr", type=float, default=0.05)
    b.add_argument("--width", type=int)
    b.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew per client")
    b.add_argument("--unseen-device", default="G4")
    b.add_argument("--thresholds", default=None,
                   help="bias-signal thresholds for levels 1 and 2 (default: SwitchConfig's, -0.15,0.5)")
    b.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="clients' lr over rounds, the same for every method (default cosine to 0.1x)")
    b.add_argument("--tail-rounds", type=int, default=5,
                   help="evaluate every one of the last N rounds; the tail table averages them")
    b.add_argument("--aggregator", choices=["auto", "lifl", "local"], default="auto",
                   help="lifl: through the LIFL server at --lifl-address; local: in-process FedAvg with LIFL's "
                        "arithmetic; auto (default): lifl when an address is given, else local")
    b.add_argument("--lifl-address", default=os.environ.get("LIFL_ADDRESS") or None, metavar="HOST:PORT",
                   help="a running LIFL server (`lifl serve --port 50051`); default $LIFL_ADDRESS")
    b.add_argument("--workers", type=int, default=1, help="parallel job processes")
    b.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ...")
    b.add_argument("--out", default="heteroswitch_bench", help="output directory")
    r = sub.add_parser("report", help="rebuild table and plots from the job_*.json files of a worker run")
    r.add_argument("out", help="the bench output directory")
    r.add_argument("--client-cost", default=None, metavar="JSON",
                   help="isolated per-remedy costs from benchmarks/bench_heteroswitch_cost.py (default: "
                        "OUT/client_cost.json when present)")
    return ap


def _float_or_off(v: str) -> float | str:
    if v == "off":
        return v
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {v!r}") from None


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    p = dict(PRESETS[a.preset])
    for k in ("rounds", "clients_per_round", "eval_every", "num_clients", "samples_per_client", "image_size",
              "local_steps", "batch_size", "width"):
        v = getattr(a, k)
        if v is not None:
            p[k] = v
    if a.image_size is not None:
        p["base_size"] = 2 * a.image_size
    bm = BENCHMARKS[a.benchmark]
    data = dataclasses.replace(
        FederatedConfig(), num_clients=p["num_clients"], samples_per_client=p["samples_per_client"], alpha=a.alpha,
        unseen_device=a.unseen_device, test_per_class=p["test_per_class"], image_size=p["image_size"],
        scene=SceneConfig(**{"base_size": p["base_size"], **bm.get("scene", {}), **parse_scene_overrides(a.scene)}),
        **{k: v for k, v in bm.items() if k not in ("scene", "switch")},
    )
    if data.device_mix.get(a.unseen_device, 0) > 0:  # swap shares: the unseen device trains nobody, G4 takes its share
        mix = dict(data.device_mix)
        mix["G4"], mix[a.unseen_device] = mix[a.unseen_device], 0.0
        data = dataclasses.replace(data, device_mix=mix)
    data.validate(list_devices(data.profiles_directory()))
    flair = None
    if a.flair is not None:
        if not Path(a.flair).is_file():
            raise FileNotFoundError(f"FLAIR HDF5 file not found: {a.flair}")
        if a.device_map is not None and not Path(a.device_map).is_file():
            raise FileNotFoundError(f"device map not found: {a.device_map}")
        flair = FlairConfig(path=str(a.flair), device_map=a.device_map, image_size=p["image_size"],
                            max_train_users=p["num_clients"], test_images=a.flair_test_images,
                            render=not a.flair_no_render, unseen_device=a.unseen_device,
                            profile_set=data.profile_set, device_mix=dict(data.device_mix))
    train = TrainConfig(local_steps=p["local_steps"], batch_size=p["batch_size"], lr=a.lr,
                        bias_eval_samples=p["samples_per_client"],
                        swad=SWADConfig(eval_every=p["swad_eval_every"], eval_samples=p["swad_eval_samples"]))
    sw_kw = dict(bm.get("switch", {}))  # the benchmark's calibrated switch, unless flags say otherwise
    if a.thresholds is not None:
        sw_kw["thresholds"] = tuple(float(x) for x in a.thresholds.split(","))
    if a.colour_threshold is not None:
        sw_kw["colour_threshold"] = None if a.colour_threshold == "off" else a.colour_threshold
    sw = SwitchConfig(**sw_kw)
    return BenchConfig(
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
        seeds=tuple(int(s) for s in a.seeds.split(",")),
        rounds=p["rounds"], clients_per_round=p["clients_per_round"], eval_every=p["eval_every"],
        model_width=p["width"], model_blocks=tuple(p["blocks"]), data=data, train=train,
        switch=sw, aggregator=a.aggregator, lifl_address=a.lifl_address, workers=a.workers, device=a.device,
        out_dir=a.out, lr_schedule=a.lr_schedule, tail_rounds=a.tail_rounds, flair=flair,
    )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "bench":
        try:
            cfg = config_from_args(a)
        except (ValueError, KeyError, FileNotFoundError) as e:
            print(f"heteroswitch bench: {e}", file=sys.stderr)
            return 2
        try:
            summary = run_bench(cfg)
        except (ValueError, KeyError, FileNotFoundError) as e:  # bad data (e.g. a FLAIR file not in FLAIR's layout)
            print(f"heteroswitch bench: {e}", file=sys.stderr)
            return 2
        print(f"results written to {cfg.out_dir}/ (results.json, table.md, per_device_ap.png, variance_over_rounds.png)")
        return 0 if summary else 1
    if a.command == "report":
        report_from_jobs(a.out, client_cost=a.client_cost)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
