"""The benchmark's report: summary with the goal check, markdown tables, plots, Pareto files;
also rebuilt from the job files of an interrupted worker run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..metrics import device_summary
from ..trainer import resolve_device
from .config import PRIMARY, BenchConfig, config_from_dict, config_to_dict


def _ms(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


TAIL_EVALS = 3  # for result files written before tail_rounds existed


def tail_history(job: dict) -> list[dict]:
    hist = job["history"]
    if "tail_rounds" in job:
        last = hist[-1]["round"]
        return [h for h in hist if h["round"] > last - job["tail_rounds"]]
    return hist[-TAIL_EVALS:]


def tail_summary(job: dict, unseen: str) -> dict:
    """Per-device AP averaged over the evaluations of the last ``tail_rounds`` rounds
    (every round there), summarised across devices.

    Why: with non-IID clients the FedAvg global model fluctuates from round to
    round, so one final-round snapshot is noisy; the tail average is the
    steadier figure.  Both are reported.
    """
    hs = tail_history(job)
    per = {d: float(np.mean([h["per_device_ap"][d] for h in hs])) for d in hs[0]["per_device_ap"]}
    return {"per_device": per, "summary": device_summary(per, unseen)}


def summarize(jobs: list[dict], unseen: str) -> dict:
    """Final-round table and last-evaluations ("tail") table, each with its goal check vs FedAvg."""
    tail_jobs = []
    for j in jobs:
        t = tail_summary(j, unseen)
        tail_jobs.append({**j, "final": {"per_device": {d: {PRIMARY: v} for d, v in t["per_device"].items()},
                                         "summary": {PRIMARY: t["summary"],
                                                     "ap_micro": {"mean": float("nan")},
                                                     "accuracy": {"mean": float("nan")}}}})
    out = _summarize_final(jobs, unseen)
    tail = _summarize_final(tail_jobs, unseen)
    out["table_tail"], out["goal_tail"] = tail["table"], tail["goal"]
    out["tail_evals"] = len(tail_history(jobs[0])) if jobs else 0
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


def write_report(cfg: BenchConfig, results: list[dict], out: Path, wall: float, log=print, failed=(),
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
    from ..pareto import write_pareto

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
    return write_report(cfg, results, out, float("nan"), log, rebuilt=True, client_cost=client_cost)


