"""One (seed, method) federated experiment, in this process or as a worker process
(``python -m heteroswitch.bench _job ...``, exchanging only JSON and ``.npz`` files)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..aggregate import make_aggregator
from ..bias import BiasSwitch, ServerReference
from ..metrics import device_summary
from ..models import make_model
from ..scenes import load_dataset
from ..trainer import evaluate_devices, load_numpy_state, resolve_device, state_to_numpy, train_local
from .config import METHODS, PRIMARY, BenchConfig, config_from_dict, round_lr


def data_path(out: Path, seed: int) -> Path:
    """Where the rendered dataset of ``seed`` lives in an output directory."""
    return out / f"data_seed{seed}.npz"


def _round_sample(seed: int, rnd: int, num_clients: int, k: int) -> list[int]:
    rng = np.random.default_rng([seed, rnd, 7])
    return sorted(rng.choice(num_clients, size=min(k, num_clients), replace=False).tolist())


def _evaluate(model, test, unseen, dev) -> dict:
    per = evaluate_devices(model, test, dev)
    return {
        "per_device": per,
        "summary": {m: device_summary({d: per[d][m] for d in per}, unseen) for m in ("ap_macro", "ap_micro", "accuracy")},
    }


def run_job(cfg: BenchConfig, dataset, seed: int, method: str, aggregator=None, log=print) -> dict:
    """Run one (seed, method) federated experiment; returns a JSON-ready dict."""
    dev = resolve_device(cfg.device)
    train_cfg = dataclasses.replace(cfg.train, device=str(dev))
    model = make_model(dataset.num_classes, cfg.model_width, cfg.model_blocks, seed=seed).to(dev)
    global_state = state_to_numpy(model)
    own_agg = aggregator is None
    agg = make_aggregator(cfg.aggregator, cfg.lifl_address, job=f"hs-{method}-s{seed}") if own_agg else aggregator
    switches: dict[str, BiasSwitch] = {}
    ref = ServerReference(cfg.switch)
    server_ref: float | None = None
    switch_log: list[list] = []  # [round, device, signal, level, colour signal, choice] per heteroswitch client-round
    cost_log: list[list] = []  # [round, client, choice, FLOPs, device-seconds] per client-round (every method)
    history, totals = [], {"compute_units": 0.0, "train_seconds": 0.0, "isp_images": 0.0, "eval_samples": 0.0,
                           "train_samples": 0.0, "client_rounds": 0, "isp_on": 0, "swad_on": 0}
    levels: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        for rnd in range(1, cfg.rounds + 1):
            picked = _round_sample(seed, rnd, len(dataset.clients), cfg.clients_per_round)
            agg.begin(global_state, expected=len(picked))
            rcfg = dataclasses.replace(train_cfg, lr=float(round_lr(cfg, rnd)))
            pre_losses, weights = [], []
            for ci in picked:
                c = dataset.clients[ci]
                load_numpy_state(model, global_state)
                tseed = int(np.random.default_rng([seed, rnd, ci]).integers(2**31))
                if method == "heteroswitch":
                    sw = switches.setdefault(c.client_id, BiasSwitch(cfg.switch))
                    res = train_local(model, c.images, c.labels, rcfg, switch=sw, server_ref=server_ref, seed=tseed)
                    pre_losses.append(res.metrics["hs_loss_global"])
                    weights.append(res.num_examples)
                    lv = str(int(res.metrics["hs_level"]))
                    levels[lv] = levels.get(lv, 0) + 1
                    sig = res.metrics["hs_signal"]
                    cs = res.metrics["hs_colour_signal"]
                    switch_log.append([rnd, c.device, None if not np.isfinite(sig) else round(float(sig), 4),
                                       int(res.metrics["hs_level"]), None if not np.isfinite(cs) else round(float(cs), 4),
                                       _choice(res.metrics)])
                else:
                    res = train_local(model, c.images, c.labels, rcfg, mode=METHODS[method], seed=tseed)
                agg.submit(res.state, res.num_examples, c.client_id)
                for k in ("compute_units", "train_seconds", "isp_images", "eval_samples", "train_samples"):
                    totals[k] += res.metrics[k]
                for k, v in res.metrics.items():
                    if k.startswith(("flops_", "dev_s_")):
                        totals[k] = totals.get(k, 0.0) + v
                ch = _choice(res.metrics)
                totals[f"choice_{ch}"] = totals.get(f"choice_{ch}", 0) + 1
                cost_log.append([rnd, c.client_id, ch, res.metrics["flops_total"],
                                 round(res.metrics["dev_s_total"], 5)])
                totals["client_rounds"] += 1
                totals["isp_on"] += int(res.metrics["mode_isp"])
                totals["swad_on"] += int(res.metrics["mode_swad"])
            global_state = agg.finish()
            if pre_losses:  # the server's reference for the next round
                server_ref = ref.update(pre_losses, weights)
            if rnd % cfg.eval_every == 0 or rnd > cfg.rounds - cfg.tail_rounds:
                load_numpy_state(model, global_state)
                ev = _evaluate(model, dataset.test, dataset.unseen_device, dev)
                s = ev["summary"][PRIMARY]
                history.append({"round": rnd, "per_device_ap": {d: v[PRIMARY] for d, v in ev["per_device"].items()},
                                "mean": s["mean"], "var": s["var"], "worst": s["worst"], "unseen": s["unseen"]})
                log(f"[{method} seed={seed}] round {rnd:3d}: AP mean {s['mean']:.4f} var {s['var']:.6f} "
                    f"worst {s['worst']:.4f} unseen {s['unseen']:.4f} ({time.perf_counter() - t0:.0f}s)")
    finally:
        if own_agg:
            agg.close()
    load_numpy_state(model, global_state)
    final = _evaluate(model, dataset.test, dataset.unseen_device, dev)
    return {"seed": seed, "method": method, "aggregator": agg.name, "final": final, "history": history,
            "compute": totals, "switch_levels": levels, "switch_log": switch_log, "cost_log": cost_log,
            "switch_by_device": _switch_by_device(switch_log), "tail_rounds": cfg.tail_rounds,
            "wall_seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)}


def _choice(metrics: dict) -> str:
    """The remedy a client-round ran: none, isp, swad or isp+swad."""
    return {(0, 0): "none", (1, 0): "isp", (0, 1): "swad", (1, 1): "isp+swad"}[
        (int(metrics["mode_isp"]), int(metrics["mode_swad"]))]


def _switch_by_device(log: list[list]) -> dict[str, dict]:
    """Per device: client-rounds, share at level >= 1 and 2, share of each choice, median signals."""
    out: dict[str, dict] = {}
    for d in sorted({r[1] for r in log}):
        rows = [r for r in log if r[1] == d]
        sig = [r[2] for r in rows if r[2] is not None]
        col = [r[4] for r in rows if len(r) > 4 and r[4] is not None]
        out[d] = {"n": len(rows), "level_ge1": float(np.mean([r[3] >= 1 for r in rows])),
                  "level2": float(np.mean([r[3] >= 2 for r in rows])),
                  "median_signal": float(np.median(sig)) if sig else float("nan"),
                  "median_colour_signal": float(np.median(col)) if col else float("nan"),
                  **{f"choice_{c}": float(np.mean([len(r) > 5 and r[5] == c for r in rows]))
                     for c in ("none", "isp", "swad", "isp+swad")}}
    return out


def job_main(argv: list[str]) -> int:
    """Worker process: run one job of the experiment in ``config.json``, write its JSON result."""
    cfg_path, seed, method, out_json = argv[0], int(argv[1]), argv[2], Path(argv[3])
    torch.set_num_threads(max(1, int(os.environ.get("HS_THREADS", "1"))))
    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    res = run_job(cfg, load_dataset(data_path(Path(cfg.out_dir), seed)), seed, method)
    out_json.write_text(json.dumps(res))
    return 0
