"""``heteroswitch bench``: the device-heterogeneity benchmark.

Methods (all FedAvg-aggregated through :mod:`heteroswitch.aggregate`, LIFL by
default):

* ``fedavg``        plain local SGD
* ``isp``           random ISP transformation always on
* ``swad``          SWAD always on
* ``isp_swad``      both always on (the compute reference for the switch)
* ``heteroswitch``  the bias switch decides per client and round

Every method gets the same client learning rate per round (cosine decay by
default, :func:`round_lr`); HeteroSwitch clients get the server reference
loss of :class:`~heteroswitch.bias.ServerReference` (median of the previous
round's reported pre-training losses, EMA-smoothed).  Besides the final round,
every round of the last ``tail_rounds`` is evaluated and reported averaged.

Per seed, the federated dataset is rendered once and shared by all methods, the
initial model and the client sample of each round are identical across
methods, so differences are the methods' own.  Each (seed, method) is a *job*;
jobs can run in parallel worker processes (``--workers``), which exchange only
JSON files and ``.npz`` arrays (no pickle).

Outputs in ``--out``: ``results.json`` (config, every job's history and final
per-device metrics, the summary and the goal check), ``table.md`` (mean +- std
over seeds), ``per_device_ap.png``, ``variance_over_rounds.png``, and the
Pareto report of accuracy/fairness against client cost (``pareto.md``,
``pareto.json``, ``pareto_<cost>.png``; :mod:`heteroswitch.pareto`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .aggregate import make_aggregator
from .bias import BiasSwitch, Mode, ServerReference, SwitchConfig
from .flair_bench import FlairConfig, load_flair_dataset
from .metrics import device_summary
from .models import make_model
from .scenes import FederatedConfig, SceneConfig, load_dataset, make_federated_dataset, save_dataset
from .trainer import TrainConfig, evaluate_devices, load_numpy_state, resolve_device, state_to_numpy, train_local

__all__ = ["METHODS", "BenchConfig", "run_job", "run_bench", "summarize", "config_from_dict", "config_to_dict"]

METHODS: dict[str, Mode | None] = {
    "fedavg": Mode(False, False),
    "isp": Mode(True, False),
    "swad": Mode(False, True),
    "isp_swad": Mode(True, True),
    "heteroswitch": None,
}
PRIMARY = "ap_macro"


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 50
    clients_per_round: int = 10
    eval_every: int = 5
    model_width: int = 16
    model_blocks: tuple[int, ...] = (1, 1, 1)
    data: FederatedConfig = field(default_factory=FederatedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    aggregator: str = "auto"       # "lifl" | "local" | "auto"
    lr_schedule: str = "cosine"    # "cosine" | "constant": the clients' lr per round, broadcast by the server
    lr_min_frac: float = 0.1       # cosine: the last round's lr = lr * lr_min_frac
    tail_rounds: int = 5           # evaluate every round among the last tail_rounds; the tail table averages them
    workers: int = 1
    device: str = "auto"
    out_dir: str = "heteroswitch_bench"
    flair: FlairConfig | None = None  # train on a FLAIR HDF5 file instead of the synthetic scenes

    @property
    def unseen_device(self) -> str:
        return self.flair.unseen_device if self.flair is not None else self.data.unseen_device

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {list(METHODS)}")
        if self.rounds < 1 or self.clients_per_round < 1 or not self.seeds:
            raise ValueError("need rounds >= 1, clients_per_round >= 1 and at least one seed")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.tail_rounds < 1:
            raise ValueError("tail_rounds must be >= 1")


def round_lr(cfg: BenchConfig, rnd: int) -> float:
    """The clients' learning rate in round ``rnd`` (1-based).

    Why a schedule (our choice, applied identically to every method): with a
    constant lr and non-IID clients the global model keeps jumping between
    rounds, so a single final-round snapshot mostly measures that jitter (the
    first GPU run had one seed dip from 0.98 to 0.85 AP in its last round).  A
    cosine decay from ``lr`` to ``lr * lr_min_frac`` lets every method settle.
    """
    base = cfg.train.lr
    if cfg.lr_schedule == "constant" or cfg.rounds == 1:
        return base
    t = (rnd - 1) / (cfg.rounds - 1)
    return base * (cfg.lr_min_frac + (1 - cfg.lr_min_frac) * 0.5 * (1 + np.cos(np.pi * t)))


# --------------------------------------------------------------------------- config <-> JSON
def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _hydrate(tp, value):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return tp(**{k: _hydrate(hints[k], v) for k, v in value.items() if k in hints})
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_hydrate(args[0], v) for v in value)
        return tuple(_hydrate(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in typing.get_args(tp):
            if a is type(None) and value is None:
                return None
        for a in typing.get_args(tp):
            if a is not type(None):
                try:
                    return _hydrate(a, value)
                except Exception:  # noqa: BLE001 - try the next member of the union
                    continue
    return value


def config_from_dict(d: dict) -> BenchConfig:
    return _hydrate(BenchConfig, d)


# --------------------------------------------------------------------------- one job
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
    agg = make_aggregator(cfg.aggregator, job=f"hs-{method}-s{seed}") if own_agg else aggregator
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


# --------------------------------------------------------------------------- summary
def _ms(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


TAIL_EVALS = 3  # for result files written before tail_rounds existed


def _tail_history(job: dict) -> list[dict]:
    hist = job["history"]
    if "tail_rounds" in job:
        last = hist[-1]["round"]
        return [h for h in hist if h["round"] > last - job["tail_rounds"]]
    return hist[-TAIL_EVALS:]


def _tail_summary(job: dict, unseen: str) -> dict:
    """Per-device AP averaged over the evaluations of the last ``tail_rounds`` rounds
    (every round there), summarised across devices.

    Why: with non-IID clients the FedAvg global model fluctuates from round to
    round, so one final-round snapshot is noisy; the tail average is the
    steadier figure.  Both are reported.
    """
    hs = _tail_history(job)
    per = {d: float(np.mean([h["per_device_ap"][d] for h in hs])) for d in hs[0]["per_device_ap"]}
    return {"per_device": per, "summary": device_summary(per, unseen)}


def summarize(jobs: list[dict], unseen: str) -> dict:
    """Final-round table and last-evaluations ("tail") table, each with its goal check vs FedAvg."""
    tail_jobs = []
    for j in jobs:
        t = _tail_summary(j, unseen)
        tail_jobs.append({**j, "final": {"per_device": {d: {PRIMARY: v} for d, v in t["per_device"].items()},
                                         "summary": {PRIMARY: t["summary"],
                                                     "ap_micro": {"mean": float("nan")},
                                                     "accuracy": {"mean": float("nan")}}}})
    out = _summarize_final(jobs, unseen)
    tail = _summarize_final(tail_jobs, unseen)
    out["table_tail"], out["goal_tail"] = tail["table"], tail["goal"]
    out["tail_evals"] = len(_tail_history(jobs[0])) if jobs else 0
    out["tail_rounds"] = jobs[0].get("tail_rounds") if jobs else None
    return out


def _summarize_final(jobs: list[dict], unseen: str) -> dict:
    by_m: dict[str, list[dict]] = {}
    for j in jobs:
        by_m.setdefault(j["method"], []).append(j)
    table = {}
    for m, js in by_m.items():
        s = [j["final"]["summary"][PRIMARY] for j in js]
        table[m] = {
            "ap_mean": _ms([x["mean"] for x in s]),
            "ap_var": _ms([x["var"] for x in s]),
            "ap_worst": _ms([x["worst"] for x in s]),
            "ap_unseen": _ms([x["unseen"] for x in s]),
            "ap_micro_mean": _ms([j["final"]["summary"]["ap_micro"]["mean"] for j in js]),
            "accuracy_mean": _ms([j["final"]["summary"]["accuracy"]["mean"] for j in js]),
            "compute_units": _ms([j["compute"]["compute_units"] for j in js]),
            "train_seconds": _ms([j["compute"]["train_seconds"] for j in js]),
            "isp_on_frac": _ms([j["compute"]["isp_on"] / max(1, j["compute"]["client_rounds"]) for j in js]),
            "swad_on_frac": _ms([j["compute"]["swad_on"] / max(1, j["compute"]["client_rounds"]) for j in js]),
            "per_device": {d: _ms([j["final"]["per_device"][d][PRIMARY] for j in js])
                           for d in js[0]["final"]["per_device"]},
        }
    goal = {}
    if "fedavg" in table and "heteroswitch" in table:
        f, h = table["fedavg"], table["heteroswitch"]
        red = 100.0 * (1.0 - h["ap_var"]["mean"] / f["ap_var"]["mean"]) if f["ap_var"]["mean"] > 0 else float("nan")
        goal = {
            "variance_reduction_pct": red,
            "variance_reduced_ge_6_3pct": bool(red >= 6.3),
            "mean_ap_delta_points": 100.0 * (h["ap_mean"]["mean"] - f["ap_mean"]["mean"]),
            "mean_ap_not_lower_by_gt_1pt": bool(100.0 * (h["ap_mean"]["mean"] - f["ap_mean"]["mean"]) >= -1.0),
            "worst_delta_points": 100.0 * (h["ap_worst"]["mean"] - f["ap_worst"]["mean"]),
            "worst_higher": bool(h["ap_worst"]["mean"] > f["ap_worst"]["mean"]),
            "unseen_delta_points": 100.0 * (h["ap_unseen"]["mean"] - f["ap_unseen"]["mean"]),
            "unseen_higher": bool(h["ap_unseen"]["mean"] > f["ap_unseen"]["mean"]),
        }
        if "isp_swad" in table:
            cu = h["compute_units"]["mean"] / table["isp_swad"]["compute_units"]["mean"]
            ts = h["train_seconds"]["mean"] / table["isp_swad"]["train_seconds"]["mean"]
            goal.update({"compute_ratio_vs_isp_swad": cu, "time_ratio_vs_isp_swad": ts,
                         "switch_cheaper_than_always_on": bool(cu < 1.0)})
        goal["all_met"] = all(v for k, v in goal.items() if isinstance(v, bool))
    return {"table": table, "goal": goal, "unseen_device": unseen}


def _fmt(ms: dict, scale: float = 100.0, digits: int = 2) -> str:
    if not np.isfinite(ms["mean"]):
        return "n/a"
    return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def render_table(summary: dict) -> str:
    text = _render_one(summary["table"], summary.get("goal"), summary["unseen_device"], "final round")
    if "table_tail" in summary:
        text += "\n" + _render_one(summary["table_tail"], summary.get("goal_tail"), summary["unseen_device"],
                                   f"per-device AP averaged over the last {summary['tail_evals']} evaluations"
                                   + (f" (every round of the last {summary['tail_rounds']})"
                                      if summary.get("tail_rounds") else ""))
    return text


def _render_one(t: dict, g: dict | None, unseen: str, what: str) -> str:
    lines = [
        f"### {what}",
        "",
        f"Macro AP (FLAIR-style, 200 thresholds) x100 over all devices; unseen device: {unseen}; "
        f"mean ± std over seeds (n={next(iter(t.values()))['ap_mean']['n']}).",
        "",
        "| method | mean AP | var AP (x1e4) | worst AP | unseen AP | micro AP | accuracy | compute units (x1e6) | train s | ISP on | SWAD on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in t.items():
        lines.append(
            f"| {m} | {_fmt(r['ap_mean'])} | {_fmt(r['ap_var'], 1e4)} | {_fmt(r['ap_worst'])} | {_fmt(r['ap_unseen'])} | "
            f"{_fmt(r['ap_micro_mean'])} | {_fmt(r['accuracy_mean'])} | {_fmt(r['compute_units'], 1e-6, 3)} | "
            f"{_fmt(r['train_seconds'], 1.0, 1)} | {_fmt(r['isp_on_frac'], 100, 0)}% | {_fmt(r['swad_on_frac'], 100, 0)}% |")
    if g:
        lines += ["", "Goal check (HeteroSwitch vs FedAvg):", ""]
        lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in g.items()]
    return "\n".join(lines) + "\n"


def write_plots(jobs: list[dict], summary: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = summary["table"]
    methods = list(t)
    devices = list(next(iter(t.values()))["per_device"])
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(devices)), 4.5))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        mu = [t[m]["per_device"][d]["mean"] for d in devices]
        sd = [t[m]["per_device"][d]["std"] for d in devices]
        ax.bar(np.arange(len(devices)) + i * w, mu, w, yerr=sd, label=m, capsize=2)
    ax.set_xticks(np.arange(len(devices)) + 0.4 - w / 2)
    ax.set_xticklabels([d + (" (unseen)" if d == summary["unseen_device"] else "") for d in devices], rotation=30, ha="right")
    lo = min(t[m]["per_device"][d]["mean"] for m in methods for d in devices)
    ax.set_ylim(max(0.0, lo - 0.1), None)
    ax.set_ylabel("macro AP")
    ax.set_title("Per-device AP (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=len(methods))
    fig.tight_layout()
    p1 = out / "per_device_ap.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in methods:
        hs = [j["history"] for j in jobs if j["method"] == m]
        rounds = [h["round"] for h in hs[0]]
        v = np.array([[h["var"] for h in hj] for hj in hs])
        ax.plot(rounds, v.mean(0), marker="o", ms=3, label=m)
        if v.shape[0] > 1:
            ax.fill_between(rounds, v.mean(0) - v.std(0), v.mean(0) + v.std(0), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("variance of AP across devices")
    ax.set_title("Cross-device AP variance over rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "variance_over_rounds.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [str(p1), str(p2)]


# --------------------------------------------------------------------------- orchestration
def _data_path(out: Path, seed: int) -> Path:
    return out / f"data_seed{seed}.npz"


def _prepare_data(cfg: BenchConfig, out: Path, log) -> None:
    dev = resolve_device(cfg.device)
    for s in cfg.seeds:
        p = _data_path(out, s)
        if not p.exists():
            t = time.perf_counter()
            ds = load_flair_dataset(cfg.flair, seed=s, device=dev) if cfg.flair is not None else \
                make_federated_dataset(cfg.data, seed=s, device=dev)
            save_dataset(ds, p)
            log(f"rendered dataset seed={s} -> {p} ({time.perf_counter() - t:.1f}s)")


def _job_cmd(cfg_path: Path, seed: int, method: str, out_json: Path, address: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "heteroswitch.bench", "_job", str(cfg_path), str(seed), method, str(out_json)]
    return cmd + ([address] if address else [])


LAUNCH_STAGGER_S = 1.0  # seconds between worker start-ups
JOB_RETRIES = 1  # a worker killed by a signal (e.g. SIGKILL by the OOM killer) is started again this often


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run every (seed, method) job, write results, table and plots; return the summary."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _prepare_data(cfg, out, log)
    jobs_spec = [(s, m) for s in cfg.seeds for m in cfg.methods]
    results: list[dict] = []
    failed: list[str] = []
    # one aggregation backend (one LIFL server) for the whole experiment, one LIFL job per (seed, method)
    server_agg = make_aggregator(cfg.aggregator, job="hs-bench")
    try:
        address = getattr(server_agg, "address", None)
        log(f"aggregator: {server_agg.name}" + (f" at {address}" if address else ""))
        if cfg.workers <= 1:
            for s, m in jobs_spec:
                ds = load_dataset(_data_path(out, s))
                agg = server_agg if server_agg.name == "local" else _lifl_job_agg(address, m, s)
                try:
                    results.append(run_job(cfg, ds, s, m, aggregator=agg, log=log))
                finally:
                    if agg is not server_agg:
                        agg.close()
        else:
            cfg_path = out / "config.json"
            cfg_path.write_text(json.dumps(config_to_dict(cfg), indent=1))
            pending = [(s, m, 0) for s, m in jobs_spec]
            running: list[tuple[subprocess.Popen, Path, tuple]] = []
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            while pending or running:
                while pending and len(running) < cfg.workers:
                    s, m, tries = spec = pending.pop(0)
                    oj = out / f"job_{m}_s{s}.json"
                    running.append((subprocess.Popen(_job_cmd(cfg_path, s, m, oj, address), env=env), oj, spec))
                    # stagger start-ups: many processes initialising torch/CUDA at once can exhaust host
                    # memory on a VM whose memory grows on demand (jobs were SIGKILLed at start-up there)
                    time.sleep(LAUNCH_STAGGER_S)
                time.sleep(0.5)
                for p, oj, (s, m, tries) in list(running):
                    if p.poll() is not None:
                        running.remove((p, oj, (s, m, tries)))
                        if p.returncode < 0 and tries < JOB_RETRIES:  # killed by a signal: run it again once
                            log(f"WARNING: bench job {oj.name} killed by signal {-p.returncode}; restarting it")
                            pending.insert(0, (s, m, tries + 1))
                            continue
                        if p.returncode != 0:  # keep going: report what finished, say what did not
                            failed.append(f"{oj.name} (exit code {p.returncode})")
                            log(f"WARNING: bench job {oj.name} failed with exit code {p.returncode}")
                            continue
                        results.append(json.loads(oj.read_text()))
    finally:
        server_agg.close()
    if not results:
        raise RuntimeError(f"every bench job failed: {failed}")
    return _report(cfg, results, out, time.perf_counter() - t0, log, failed)


def _report(cfg: BenchConfig, results: list[dict], out: Path, wall: float, log=print, failed=(),
            rebuilt: bool = False, client_cost=None) -> dict:
    order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in cfg.seeds for m in cfg.methods)}
    results.sort(key=lambda j: order.get((j["seed"], j["method"]), 1 << 30))
    summary = summarize(results, cfg.unseen_device)
    # where the jobs ran: from the job files when they say (a report may be rebuilt on another machine)
    torch_v = sorted({j["torch"] for j in results if "torch" in j}) or ([None] if rebuilt else [torch.__version__])
    names = sorted({j["device_name"] for j in results if "device_name" in j})
    doc = {"config": config_to_dict(cfg), "jobs": results, "summary": summary, "failed_jobs": list(failed),
           "device": str(resolve_device(cfg.device)), "device_name": ", ".join(names) or None,
           "torch": ", ".join(v for v in torch_v if v) or None, "wall_seconds": wall,
           "rebuilt_from_job_files": rebuilt}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    table = render_table(summary)
    if failed:
        table += "\nFailed jobs (not in the table): " + ", ".join(failed) + "\n"
    (out / "table.md").write_text(table)
    write_plots(results, summary, out)
    from .pareto import write_pareto

    if client_cost is None and (out / "client_cost.json").is_file():
        client_cost = out / "client_cost.json"
    write_pareto(results, summary, out, client_cost)
    log(table)
    log((out / "pareto.md").read_text())
    return summary


def report_from_jobs(out_dir: str | Path, log=print, client_cost=None) -> dict:
    """Rebuild results/table/plots/Pareto report from the ``job_*.json`` files of a (possibly
    interrupted) worker run; ``client_cost``: a ``bench_heteroswitch_cost.py`` JSON for isolated costs."""
    out = Path(out_dir)
    cfg = config_from_dict(json.loads((out / "config.json").read_text()))
    results = [json.loads(p.read_text()) for p in sorted(out.glob("job_*.json"))]
    if not results:
        raise FileNotFoundError(f"no job_*.json files in {out}")
    return _report(cfg, results, out, float("nan"), log, rebuilt=True, client_cost=client_cost)


def _lifl_job_agg(address: str, method: str, seed: int):
    from .aggregate import LiflAggregator

    return LiflAggregator(address, job=f"hs-{method}-s{seed}")


def _job_main(argv: list[str]) -> int:
    cfg_path, seed, method, out_json = argv[0], int(argv[1]), argv[2], Path(argv[3])
    address = argv[4] if len(argv) > 4 else None
    torch.set_num_threads(max(1, int(os.environ.get("HS_THREADS", "1"))))
    cfg = config_from_dict(json.loads(Path(cfg_path).read_text()))
    ds = load_dataset(_data_path(Path(cfg.out_dir), seed))
    if address:
        from .aggregate import LiflAggregator

        agg = LiflAggregator(address, job=f"hs-{method}-s{seed}")
    else:
        agg = make_aggregator("local")
    try:
        res = run_job(cfg, ds, seed, method, aggregator=agg)
    finally:
        agg.close()
    out_json.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":  # internal worker entry: python -m heteroswitch.bench _job CFG SEED METHOD OUT [ADDR]
    if len(sys.argv) > 1 and sys.argv[1] == "_job":
        sys.exit(_job_main(sys.argv[2:]))
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
