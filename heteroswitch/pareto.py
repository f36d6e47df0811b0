"""Accuracy and fairness against client cost: the Pareto report of ``heteroswitch bench``.

Per method (mean over seeds): mean AP, cross-device AP variance, worst-device
and unseen-device AP, and three client costs per client-round:

* ``gflop``   counted FLOPs (:mod:`heteroswitch.cost`: SGD, probes, ISP, SWAD);
* ``dev_s``   device-seconds measured in the run (CUDA events; concurrent jobs
              share the GPU, so this includes waiting for the others);
* ``iso_s``   device-seconds from the isolated, interleaved measurement of each
              remedy (``benchmarks/bench_heteroswitch_cost.py``, medians), summed
              over the remedies the method actually ran -- given a
              ``client_cost.json``; an additive model, stated in :func:`isolated_seconds`.

A method is on the front of (metric, cost) when no other method is at least as
good on both and better on one; ``front_all`` uses all four metrics and the cost.
:func:`goal_check` is issue 19's goal, computed, never asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["ALWAYS_ON", "dominates", "pareto_front", "isolated_seconds", "method_points", "goal_check",
           "render_pareto", "write_pareto_plots", "write_pareto"]

ALWAYS_ON = ("isp", "swad", "isp_swad")
METRICS = (("mean", +1), ("var", -1), ("worst", +1), ("unseen", +1))  # +1: higher is better
COSTS = ("gflop", "dev_s", "iso_s")
_MODE_OF = {"fedavg": "none", "isp": "isp", "swad": "swad", "isp_swad": "isp+swad"}


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` dominates ``b`` (all objectives to be maximised): >= everywhere and > somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: dict[str, tuple[float, ...]]) -> set[str]:
    """Names whose objective tuple (to maximise) no other point dominates; NaN points are never on it."""
    ok = {k: p for k, p in points.items() if all(np.isfinite(p))}
    return {k for k, p in ok.items() if not any(dominates(q, p) for j, q in ok.items() if j != k)}


def isolated_seconds(choices: dict[str, float], probes: float, colour_probes: float, med: dict[str, dict]) -> float:
    """Device-seconds of a job's client-rounds from isolated per-remedy medians (additive model):
    each client-round costs its remedy's median (``none``/``isp``/``swad``/``isp+swad``), plus the
    bias probe's extra over ``none`` for every switch decision, plus the colour probe's extra
    (``probe+colour+isp`` − ``probe`` − (``isp`` − ``none``)) where it was measured."""
    t = lambda v: med[v]["dev_s_total"]  # noqa: E731
    base = sum(n * t(c) for c, n in choices.items())
    probe = t("probe") - t("none")
    colour = t("probe+colour+isp") - t("probe") - (t("isp") - t("none"))
    return base + probes * probe + colour_probes * colour


def _job_costs(job: dict, med: dict | None) -> dict[str, float]:
    c = job["compute"]
    n = max(1, c["client_rounds"])
    out = {"gflop": c.get("flops_total", float("nan")) / 1e9 / n, "dev_s": c.get("dev_s_total", float("nan")) / n,
           "iso_s": float("nan")}
    if med is not None:
        if job["method"] in _MODE_OF:
            choices, probes, colour = {_MODE_OF[job["method"]]: n}, 0.0, 0.0
        else:
            choices = {k[len("choice_"):]: v for k, v in c.items() if k.startswith("choice_")}
            probes = float(len(job["switch_log"]))
            colour = float(sum(1 for r in job["switch_log"] if len(r) > 4 and r[4] is not None))
        out["iso_s"] = isolated_seconds(choices, probes, colour, med) / n
    return out


def method_points(jobs: list[dict], table: dict, client_cost: dict | None = None) -> dict[str, dict]:
    """Per method: the four metrics (from a summary table) and the three costs per client-round (means over seeds)."""
    med = client_cost["median"] if client_cost else None
    out: dict[str, dict] = {}
    for m, row in table.items():
        costs = [_job_costs(j, med) for j in jobs if j["method"] == m]
        out[m] = {"mean": row["ap_mean"]["mean"], "var": row["ap_var"]["mean"], "worst": row["ap_worst"]["mean"],
                  "unseen": row["ap_unseen"]["mean"], "n": row["ap_mean"]["n"],
                  **{k: float(np.mean([c[k] for c in costs])) for k in COSTS}}
    return out


def _fronts(pts: dict[str, dict]) -> dict[str, dict[str, set[str]]]:
    out: dict[str, dict[str, set[str]]] = {}
    for cost in COSTS:
        out[cost] = {k: pareto_front({m: (s * p[k], -p[cost]) for m, p in pts.items()}) for k, s in METRICS}
        out[cost]["all"] = pareto_front({m: tuple(s * p[k] for k, s in METRICS) + (-p[cost],) for m, p in pts.items()})
    return out


def goal_check(pts: dict[str, dict], cost: str = "gflop", switch: str = "heteroswitch") -> dict:
    """Issue 19's goal for the switch: variance >= 6.3 % below FedAvg; no worse than the best always-on
    method on variance and on worst-device AP, at <= 0.8x that method's cost; mean AP within 1 point
    of the best method's."""
    h, f = pts.get(switch), pts.get("fedavg")
    on = {m: pts[m] for m in ALWAYS_ON if m in pts}
    if h is None or f is None or not on:
        return {}
    best_var = min(on, key=lambda m: on[m]["var"])
    best_worst = max(on, key=lambda m: on[m]["worst"])
    best_mean = max(pts, key=lambda m: pts[m]["mean"])
    g = {
        "cost": cost,
        "variance_vs_fedavg_pct": 100.0 * (1 - h["var"] / f["var"]),
        "best_always_on_variance": best_var,
        "best_always_on_worst": best_worst,
        "best_mean": best_mean,
        "cost_ratio_vs_best_variance_method": h[cost] / on[best_var][cost],
        "cost_ratio_vs_best_worst_method": h[cost] / on[best_worst][cost],
        "mean_gap_points": 100.0 * (pts[best_mean]["mean"] - h["mean"]),
    }
    g["variance_6_3pct_below_fedavg"] = bool(g["variance_vs_fedavg_pct"] >= 6.3)
    g["variance_no_worse_than_best_always_on"] = bool(h["var"] <= on[best_var]["var"])
    g["worst_no_worse_than_best_always_on"] = bool(h["worst"] >= on[best_worst]["worst"])
    g["cost_le_0_8x"] = bool(max(g["cost_ratio_vs_best_variance_method"], g["cost_ratio_vs_best_worst_method"]) <= 0.8)
    g["mean_within_1_point_of_best"] = bool(g["mean_gap_points"] <= 1.0)
    g["all_met"] = all(v for v in g.values() if isinstance(v, bool))
    return g


def render_pareto(pts: dict[str, dict], what: str) -> str:
    fr = _fronts(pts)
    f = pts.get("fedavg")
    lines = [f"### Pareto report ({what})", "",
             "AP ×100, variance ×1e4; costs per client-round: counted GFLOP, device-seconds measured in the run "
             "(concurrent jobs), device-seconds from the isolated per-remedy medians; ratios to FedAvg in brackets; "
             "front: the metrics (m = mean, v = variance, w = worst, u = unseen) on whose 2-D Pareto front "
             "against that cost the method lies.", "",
             "| method | mean AP | var AP | worst AP | unseen AP | GFLOP | dev-s (run) | dev-s (isolated) "
             "| front (GFLOP) | front (dev-s run) | front (dev-s isolated) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def c(m, k, fmt):
        v = pts[m][k]
        if not np.isfinite(v):
            return "n/a"
        r = f" [{v / f[k]:.2f}×]" if f and np.isfinite(f[k]) and f[k] > 0 else ""
        return f"{v:{fmt}}{r}"

    for m, p in pts.items():
        lines.append(
            f"| {m} | {100 * p['mean']:.2f} | {1e4 * p['var']:.2f} | {100 * p['worst']:.2f} | {100 * p['unseen']:.2f} | "
            f"{c(m, 'gflop', '.1f')} | {c(m, 'dev_s', '.3f')} | {c(m, 'iso_s', '.3f')} | "
            + " | ".join("".join(k[0] for k, _ in METRICS if m in fr[c_][k]) or "-" for c_ in COSTS) + " |")
    for cost in COSTS:
        if not all(np.isfinite(p[cost]) for p in pts.values()):
            continue
        g = goal_check(pts, cost)
        if g:
            lines += ["", f"Goal (issue 19), cost = {cost}: " + "; ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in g.items() if k != "cost")]
    return "\n".join(lines) + "\n"


def write_pareto_plots(pts: dict[str, dict], out: Path, stem: str = "pareto") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = _fronts(pts)
    paths = []
    labels = {"mean": "mean AP ×100", "var": "AP variance across devices ×1e4 (lower is better)",
              "worst": "worst-device AP ×100", "unseen": "unseen-device AP ×100"}
    scale = {"mean": 100, "var": 1e4, "worst": 100, "unseen": 100}
    xlab = {"gflop": "GFLOP per client-round (counted)", "dev_s": "device-seconds per client-round (in run)",
            "iso_s": "device-seconds per client-round (isolated medians)"}
    for cost in COSTS:
        if not all(np.isfinite(p[cost]) for p in pts.values()):
            continue
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
        for ax, (k, _) in zip(axes.flat, METRICS):
            front = fr[cost][k]
            for m, p in pts.items():
                on = m in front
                ax.scatter(p[cost], scale[k] * p[k], s=70 if on else 35, marker="o" if on else "x",
                           color="C3" if m == "heteroswitch" else ("C0" if on else "0.5"), zorder=3)
                ax.annotate(m, (p[cost], scale[k] * p[k]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            fp = sorted((pts[m][cost], scale[k] * pts[m][k]) for m in front)
            if len(fp) > 1:
                ax.plot(*zip(*fp), color="C0", lw=1, alpha=0.6, zorder=2)
            ax.set_ylabel(labels[k], fontsize=8)
            ax.set_xlabel(xlab[cost], fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"Accuracy/fairness vs client cost ({cost}); filled dots: Pareto front of that pair")
        fig.tight_layout()
        p = out / f"{stem}_{cost}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def write_pareto(jobs: list[dict], summary: dict, out: Path, client_cost: dict | str | Path | None = None) -> dict:
    """Write ``pareto.md``, ``pareto.json`` and ``pareto_<cost>.png`` (tail figures: the steadier ones)."""
    if isinstance(client_cost, (str, Path)):
        client_cost = json.loads(Path(client_cost).read_text())
    tables = {"final round": summary["table"]}
    if "table_tail" in summary:
        tables[f"last {summary.get('tail_rounds') or summary.get('tail_evals')} rounds averaged"] = summary["table_tail"]
    text, doc = "", {}
    for what, table in tables.items():
        pts = method_points(jobs, table, client_cost)
        text += render_pareto(pts, what) + "\n"
        doc[what] = {"points": pts, "goal": {c: goal_check(pts, c) for c in COSTS
                                             if all(np.isfinite(p[c]) for p in pts.values())}}
    (out / "pareto.md").write_text(text)
    (out / "pareto.json").write_text(json.dumps(doc, indent=1))
    write_pareto_plots(pts, out)  # the last table: the tail when there is one
    return doc
