"""A run record rendered for people: a Markdown report and matplotlib plots beside it."""
from __future__ import annotations

import statistics
from pathlib import Path

from .records import RunRecord, VariantRecord


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def summary(v: VariantRecord) -> dict:
    errs = [r.max_rel_error for r in v.rounds if r.max_rel_error is not None]
    refused: dict[str, int] = {}
    for r in v.rounds:
        for k, n in r.refused.items():
            refused[k] = refused.get(k, 0) + n
    return {"mode": v.mode, "variant": v.variant, "clients": max((r.selected for r in v.rounds), default=0),
            "rounds": len(v.rounds), "round_s": _med(r.round_s for r in v.rounds),
            "post_arrival_s": _med(r.post_arrival_s for r in v.rounds),
            "cpu_gateway": v.cpu.get("gateway", 0.0), "cpu_functions": v.cpu.get("functions", 0.0),
            "cpu_clients": v.cpu.get("clients", 0.0), "cpu_platform": v.cpu_total,
            "peak_mib": v.peak_pss_bytes / 2**20,
            "cold": v.counters.get("cold_starts", v.counters.get("lifl_cold_starts_total", 0)),
            "warm": v.counters.get("warm_reuses", v.counters.get("lifl_warm_reuses_total", 0)),
            "max_rel_error": max(errs) if errs else None, "refused": refused, "wall_s": v.wall_s,
            "mb_processes": v.bytes_between_processes / 1e6, "mb_nodes": v.bytes_between_nodes / 1e6}


def _f(x, fmt=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "-"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def markdown(rec: RunRecord, plots: list[str] = ()) -> str:
    c, m = rec.config, rec.machine
    w, t, r = c["workload"], c["trace"], c["run"]
    lines = [f"# lifl sim report", "",
             f"Workload: {w['clients_per_round']} clients/round (sizes {r.get('sizes') or '-'}), {w['rounds']} rounds, "
             f"model `{w['model'] if not r['training'] else 'softmax (training mode)'}`, dropout {w['dropout']}, "
             f"trace `{t['kind']}`; mode {r['mode']}; variants {', '.join(r['variants'])}.",
             f"Machine: {m.get('cpus')} CPUs, {m.get('memory_bytes', 0) / 2**30:.1f} GiB, Python {m.get('python')}.", "",
             "## Variants", "",
             "| mode | variant | clients | rounds | round s (median) | post-arrival s | CPU-s gateway | "
             "CPU-s functions | CPU-s clients | peak MiB | cold starts | warm reuses | MB between processes | "
             "MB between nodes | max rel err | refused/lost | sim wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sums = [summary(v) for v in rec.variants]
    for s in sums:
        lines.append(f"| {s['mode']} | {s['variant']} | {s['clients']} | {s['rounds']} | {_f(s['round_s'])} | "
                     f"{_f(s['post_arrival_s'])} | {_f(s['cpu_gateway'])} | {_f(s['cpu_functions'])} | "
                     f"{_f(s['cpu_clients'])} | {_f(s['peak_mib'], '.1f')} | {s['cold']:g} | {s['warm']:g} | "
                     f"{_f(s['mb_processes'], '.1f')} | {_f(s['mb_nodes'], '.1f')} | "
                     f"{_f(s['max_rel_error'])} | {s['refused'] or '-'} | {_f(s['wall_s'], '.1f')} |")
    base = {(s["mode"], s["clients"]): s for s in sums if s["variant"] == "lifl"}
    others = [s for s in sums if s["variant"] != "lifl" and (s["mode"], s["clients"]) in base]
    if others:
        lines += ["", "## Against full LIFL (ratio variant / lifl, same mode and size)", "",
                  "| mode | clients | variant | round time | post-arrival | platform CPU-s | peak memory |",
                  "|---|---|---|---|---|---|---|"]
        for s in others:
            b = base[(s["mode"], s["clients"])]

            def ratio(k):
                return _f(s[k] / b[k], ".2f") if b[k] else "-"
            lines.append(f"| {s['mode']} | {s['clients']} | {s['variant']} | {ratio('round_s')} | "
                         f"{ratio('post_arrival_s')} | {ratio('cpu_platform')} | {ratio('peak_mib')} |")
    if rec.validation:
        lines += ["", "## Virtual against real (round time)", "",
                  "| variant | round | clients | real s | virtual s | error |", "|---|---|---|---|---|---|"]
        for v in rec.validation:
            lines.append(f"| {v['variant']} | {v['round']} | {v['clients']} | {v['real_s']:.3f} | "
                         f"{v['virtual_s']:.3f} | {_f(100 * v['error'], '+.1f') if v['error'] is not None else '-'} % |")
    acc = [(v, r) for v in rec.variants for r in v.rounds if r.accuracy is not None]
    if acc:
        lines += ["", "## Accuracy (training mode)", "", "| mode | variant | round | clock s | accuracy |",
                  "|---|---|---|---|---|"]
        for v, rr in _thin(acc):
            lines.append(f"| {v.mode} | {v.variant} | {rr.round} | {rr.start_s + rr.round_s:.2f} | {rr.accuracy:.3f} |")
    if rec.calibration:
        lines += ["", "## Calibration (virtual mode)", "", "| cost | value |", "|---|---|"]
        lines += [f"| {k} | {_f(v, '.4g')} |" for k, v in rec.calibration.get("costs", {}).items()]
        lines += [f"", f"Sources: {rec.calibration.get('source')}"]
    notes = sorted({n for v in rec.variants for n in v.notes})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _thin(rows: list, most: int = 25) -> list:
    """At most ``most`` rows per (mode, variant), evenly spread, the last one kept (FedBuff's versions)."""
    by: dict = {}
    for v, rr in rows:
        by.setdefault((v.mode, v.variant), []).append((v, rr))
    out = []
    for rs in by.values():
        step = max(1, -(-len(rs) // most))
        out += rs[::step] + ([rs[-1]] if (len(rs) - 1) % step else [])
    return out


def plots(rec: RunRecord, out: Path) -> list[str]:
    """Write the PNG plots next to the report; returns their paths."""
    try:
        import matplotlib
    except ImportError:  # plots need the sim extra; the JSON and Markdown do not
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with_tl = [v for v in rec.variants if v.timeline.get("t")]
    if with_tl:
        fig, axes = plt.subplots(len(with_tl), 1, figsize=(8, 2.4 * len(with_tl)), squeeze=False)
        for ax, v in zip(axes[:, 0], with_tl):
            tl = v.timeline
            drawn = [ax.step(tl["t"], ys, where="post", label=f"{role} functions",
                             linewidth=2.0 if role == "total" else 0.8, alpha=1.0 if role == "total" else 0.7)
                     for role, ys in tl["alive"].items() if any(ys)]
            ax.set_ylabel("alive")
            ax2 = ax.twinx()
            if tl.get("arrivals"):
                width = tl.get("arrival_bin_s") or 1.0
                ax2.bar(tl["arrival_bins"], [a / width for a in tl["arrivals"]], width=width, alpha=0.25,
                        color="grey", align="edge", label="arrivals/s")
                ax2.set_ylabel("arrivals/s")
            ax.set_title(f"{v.mode}/{v.variant}, {max((r.selected for r in v.rounds), default=0)} clients")
            if drawn:
                ax.legend(loc="upper left", fontsize=7)
        axes[-1, 0].set_xlabel("time (s)")
        fig.tight_layout()
        paths.append(_save(fig, out / "aggregators_vs_arrivals.png"))
    sums = [summary(v) for v in rec.variants]
    if sums:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        labels = [f"{s['mode']}/{s['variant']}\n{s['clients']}" for s in sums]
        a.bar(labels, [s["round_s"] for s in sums])
        a.set_ylabel("round time (s, median)")
        b.bar(labels, [s["cpu_gateway"] for s in sums], label="gateway")
        b.bar(labels, [s["cpu_functions"] for s in sums], bottom=[s["cpu_gateway"] for s in sums],
              label="functions / aggregation")
        b.set_ylabel("platform CPU-s")
        b.legend(fontsize=7)
        for ax in (a, b):
            ax.tick_params(axis="x", labelsize=7, rotation=45)
        fig.tight_layout()
        paths.append(_save(fig, out / "round_time_and_cpu.png"))
    sizes = sorted({s["clients"] for s in sums})
    if len(sizes) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in sorted({(s["mode"], s["variant"]) for s in sums}):
            pts = sorted((s["clients"], s["round_s"]) for s in sums if (s["mode"], s["variant"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="/".join(key))
        ax.set_xscale("log")
        ax.set_xlabel("clients per round")
        ax.set_ylabel("round time (s)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / "scaling.png"))
    acc = [v for v in rec.variants if any(r.accuracy is not None for r in v.rounds)]
    if acc:
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        for v in acc:
            rs = [r for r in v.rounds if r.accuracy is not None]
            mk = "o" if len(rs) <= 60 else None   # FedBuff publishes thousands of versions
            a.plot([r.round for r in rs], [r.accuracy for r in rs], marker=mk, label=f"{v.mode}/{v.variant}")
            b.plot([r.start_s + r.round_s for r in rs], [r.accuracy for r in rs], marker=mk)
        a.set_xlabel("round")
        b.set_xlabel("simulated wall-clock (s)")
        a.set_ylabel("test accuracy")
        a.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / "accuracy.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write(rec: RunRecord, out_dir: str | Path) -> dict[str, str]:
    """run.json, report.md and the plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    js = rec.save(out / "run.json")
    return render(rec, out) | {"json": str(js)}


def render(rec: RunRecord, out: Path) -> dict[str, str]:
    ps = plots(rec, out)
    md = out / "report.md"
    md.write_text(markdown(rec, ps))
    return {"markdown": str(md), "plots": ", ".join(ps)}
