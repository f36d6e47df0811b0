"""``lifl sim run`` and ``lifl sim report``: the command-line face of :mod:`lifl.sim`."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``sim`` on the ``lifl`` command's subparsers."""
    from .config import VARIANTS   # light: tomllib and dataclasses
    s = sub.add_parser("sim", help="simulate many clients (real processes or virtual time); report with plots")
    ss = s.add_subparsers(dest="sim_command", required=True)
    r = ss.add_parser("run", help="run a simulation; writes run.json, report.md and plots")
    r.add_argument("--config", help="sim.toml with [workload], [trace], [run], [server] tables")
    r.add_argument("--mode", choices=["virtual", "real", "both"])
    r.add_argument("--clients", type=int, help="clients per round")
    r.add_argument("--population", type=int, help="clients that exist (default: clients per round)")
    r.add_argument("--rounds", type=int)
    r.add_argument("--model", help="zoo name, mlp100k, dense:N or an .npz file")
    r.add_argument("--dropout", type=float)
    r.add_argument("--trace", help="all_at_once, uniform, bursty, diurnal, straggler, file, fedscale")
    r.add_argument("--trace-file", help="our JSONL/CSV trace, or FedScale's client_behave_trace pickle")
    r.add_argument("--capacity-file", help="FedScale's client_device_capacity pickle")
    r.add_argument("--window", type=float, help="seconds over which arrivals spread")
    r.add_argument("--variants", help="comma-separated: " + ", ".join(VARIANTS))
    r.add_argument("--sizes", help="comma-separated clients-per-round sweep")
    r.add_argument("--processes", type=int, help="real mode: client processes")
    r.add_argument("--threads", type=int, help="real mode: pushes in flight per client process")
    r.add_argument("--training", action="store_true", default=None, help="clients train a small numpy model")
    r.add_argument("--aggregation", choices=["sync", "fedbuff"],
                   help="training mode: fedbuff = asynchronous FedBuff against synchronous FedAvg on the trace's clock")
    r.add_argument("--buffer-size", type=int, help="fedbuff: K updates per version")
    r.add_argument("--concurrency", type=int, help="fedbuff: clients training at once (default: --clients)")
    r.add_argument("--server-lr", type=float, help="fedbuff: server learning rate")
    r.add_argument("--horizon", type=float, help="fedbuff: virtual seconds to simulate")
    r.add_argument("--seed", type=int)
    r.add_argument("-o", "--out", help="output directory (default sim-out)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_run)
    p = ss.add_parser("report", help="re-render report.md and plots from a run.json")
    p.add_argument("record", help="run.json written by `lifl sim run`")
    p.add_argument("-o", "--out", help="directory for report.md and plots (default: beside the record)")
    p.set_defaults(fn=cmd_report)


def _overrides(a) -> dict:
    return {"run.mode": a.mode, "workload.clients_per_round": a.clients, "workload.population": a.population,
            "workload.rounds": a.rounds, "workload.model": a.model, "workload.dropout": a.dropout,
            "workload.seed": a.seed, "trace.kind": a.trace, "trace.path": a.trace_file,
            "trace.capacity_path": a.capacity_file, "trace.window_s": a.window, "run.variants": a.variants,
            "run.sizes": a.sizes, "run.processes": a.processes, "run.threads": a.threads,
            "run.training": a.training, "run.aggregation": a.aggregation, "run.buffer_size": a.buffer_size,
            "run.concurrency": a.concurrency, "run.server_lr": a.server_lr, "run.horizon_s": a.horizon,
            "run.out": a.out, "run.progress": False if a.no_progress else None}


def cmd_run(a) -> int:
    from . import config, report, runner
    cfg = config.load(a.config, _overrides(a))
    try:
        if cfg.run.progress and sys.stderr.isatty():
            with _Progress(cfg) as bar:
                rec = runner.run(cfg, bar.update)
        else:
            rec = runner.run(cfg, lambda what, rr: print(f"{what}: round {rr.round} {rr.round_s:.3f}s "
                                                          f"({rr.reported} updates)", file=sys.stderr))
    except RuntimeError as e:  # a server or client process that failed: one line, non-zero
        raise SystemExit(f"lifl sim: {e}") from None
    out = report.write(rec, cfg.run.out)
    for k, v in out.items():
        if v:
            print(f"{k}: {v}")
    bad = [v.variant for v in rec.variants for r in v.rounds if v.variant != "serverful"  # Flower sums in float32
           and r.max_rel_error is not None and not r.max_rel_error <= 1e-6]
    if bad:
        print(f"lifl sim: results of {sorted(set(bad))} differ from float64 FedAvg by more than 1e-6",
              file=sys.stderr)
        return 1
    return 0


def cmd_report(a) -> int:
    from . import report
    from .records import RunRecord
    rec = RunRecord.load(a.record)
    out = report.render(rec, Path(a.out) if a.out else Path(a.record).parent)
    for k, v in out.items():
        if v:
            print(f"{k}: {v}")
    return 0


class _Progress:
    """A rich progress bar over every round of every size, variant and mode."""

    def __init__(self, cfg):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        modes = 2 if cfg.run.mode == "both" else 1
        total = cfg.workload.rounds * len(cfg.run.variants) * modes * max(1, len(cfg.run.sizes))
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.p.add_task("lifl sim", total=total)

    def update(self, what: str, rr) -> None:
        self.p.update(self.task, advance=1, description=f"{what} r{rr.round}: {rr.round_s:.2f}s")

    def __enter__(self):
        self.p.start()
        return self

    def __exit__(self, *exc):
        self.p.stop()
