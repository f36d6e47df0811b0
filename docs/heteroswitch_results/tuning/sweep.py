"""Calibration sweep for the device benchmark and the switch thresholds (one tuning seed).

Run from the repo root:  PYTHONPATH=. python docs/heteroswitch_results/tuning/sweep.py run SPECS.json OUTDIR PARALLEL
Each spec: {"name", "method", "seed", "rounds", "scene": {...}, "thresholds": [..]}; every job starts from the
``gpu`` preset, aggregates with the in-process FedAvg (tuning only) and writes OUTDIR/<name>.json with per-device AP
(final and tail), compute and the switch's per-device decisions.  Selection must use the *seen* devices only:
the unseen device's AP is written but is not to be looked at for choosing.
"""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(spec):
    from heteroswitch.bias import SwitchConfig
    from heteroswitch.cli import build_parser, config_from_args
    from heteroswitch.scenes import SceneConfig

    argv = ["bench", "--preset", spec.get("preset", "gpu"), "--seeds", str(spec.get("seed", 100)),
            "--methods", spec["method"], "--rounds", str(spec.get("rounds", 30)),
            "--clients-per-round", str(spec.get("cpr", 8)), "--aggregator", "local"]
    cfg = config_from_args(build_parser().parse_args(argv))
    scene = dataclasses.replace(cfg.data.scene, **{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in spec.get("scene", {}).items()})
    data = dataclasses.replace(cfg.data, scene=scene)
    sw = cfg.switch
    if "thresholds" in spec:
        sw = dataclasses.replace(sw, thresholds=tuple(spec["thresholds"]))
    return dataclasses.replace(cfg, data=data, switch=sw)


def job(spec_json, out):
    from heteroswitch.aggregate import make_aggregator
    from heteroswitch.bench import run_job
    from heteroswitch.bench.report import tail_summary as _tail_summary
    from heteroswitch.scenes import make_federated_dataset

    torch.set_num_threads(1)
    spec = json.loads(spec_json)
    cfg = build(spec)
    seed = spec.get("seed", 100)
    t = time.time()
    ds = make_federated_dataset(cfg.data, seed=seed, device="cuda" if torch.cuda.is_available() else "cpu")
    res = run_job(cfg, ds, seed, spec["method"], aggregator=make_aggregator("local"), log=lambda *a: None)
    tail = _tail_summary(res, ds.unseen_device)
    doc = {"spec": spec, "final_per_device": {d: v["ap_macro"] for d, v in res["final"]["per_device"].items()},
           "tail_per_device": tail["per_device"], "compute": res["compute"],
           "switch_by_device": res["switch_by_device"], "hist": [(h["round"], h["mean"], h["var"]) for h in res["history"]],
           "unseen": ds.unseen_device, "seconds": time.time() - t}
    Path(out).write_text(json.dumps(doc))


def run(specs_path, outdir, parallel):
    specs = json.loads(Path(specs_path).read_text())
    Path(outdir).mkdir(parents=True, exist_ok=True)
    pending, running = list(specs), []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while pending or running:
        while pending and len(running) < parallel:
            s = pending.pop(0)
            running.append((subprocess.Popen([sys.executable, __file__, "job", json.dumps(s),
                                              str(Path(outdir) / f"{s['name']}.json")], env=env), s["name"]))
        time.sleep(0.5)
        for p, n in list(running):
            if p.poll() is not None:
                running.remove((p, n))
                print(f"{n}: exit {p.returncode}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "job":
        job(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
