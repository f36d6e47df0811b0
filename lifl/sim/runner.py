"""Run a simulation: every mode and variant of a config on one trace, into one :class:`RunRecord`."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import replace
from typing import Callable

import numpy as np

from ..config import ServerConfig
from ..layout import Layout, TensorSpec
from . import training
from .calibrate import costs_for
from .config import SimConfig, server_settings
from .records import RoundRecord, RunRecord, VariantRecord
from .traces import Trace, build
from .workload import examples, model_specs, plan_round, update_bytes



def _specs(cfg: SimConfig):
    return training.load_task(cfg.run.task).SPECS if cfg.run.training else model_specs(cfg.workload.model)


def run_virtual_variant(cfg: SimConfig, trace: Trace, variant: str, costs,
                        on_round: Callable[[RoundRecord], None] | None = None) -> VariantRecord:
    from .virtual import run_virtual
    specs = _specs(cfg)
    nbytes = update_bytes(specs)
    numel = sum(int(np.prod(s, dtype=np.int64)) for _, s, _ in specs)
    weights = examples(trace, cfg.workload)
    server = ServerConfig(**server_settings(cfg, variant)).validate()
    r = cfg.run
    layout = Layout.from_specs([TensorSpec(n, d, tuple(sh)) for n, sh, d in specs])
    rec = run_virtual(lambda rnd, t: plan_round(trace, cfg.workload, rnd, t, nbytes, weights), cfg.workload.rounds,
                      variant, server, costs, nbytes, numel, nodes=r.nodes, cores_per_node=r.cores_per_node,
                      tick_s=r.tick_s, on_round=on_round, layout=layout)
    if r.training:
        _virtual_training(cfg, trace, rec, weights, nbytes)
    return rec


def _virtual_training(cfg: SimConfig, trace: Trace, rec: VariantRecord, weights, nbytes) -> None:
    """Training mode in virtual time: the clients each round selected really train; float64 FedAvg.
    (The average is cast back to each tensor's dtype as LIFL's result is.)"""
    w, r = cfg.workload, cfg.run
    task = training.load_task(r.task)
    model = task.initial_model(w.seed)
    for rr in rec.rounds:
        row = plan_round(trace, w, rr.round, rr.start_s, nbytes, weights)
        acc = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
        for c, x in zip(row.reporting, row.weights[row.reports]):
            up = task.local_train(model, w.seed, int(c), int(x), lr=r.learning_rate, epochs=r.local_epochs)
            for k in acc:
                acc[k] += x * up[k]
        total = float(row.weights[row.reports].sum())
        model = {k: (v / total).astype(model[k].dtype) for k, v in acc.items()}
        rr.accuracy = task.accuracy(model, w.seed)


def run_real_variant(cfg: SimConfig, trace: Trace, variant: str,
                     on_round: Callable[[RoundRecord], None] | None = None) -> VariantRecord:
    from .real import run_real
    server = server_settings(cfg, variant)
    server.setdefault("metrics_port", 0)
    command = None
    if variant == "serverful":  # the same pool and trace against Flower's collect-then-aggregate
        command = [sys.executable, "-m", "lifl.sim.serverful", "--port", "0"]
    return run_real(cfg, trace, variant, server, command=command, on_round=on_round)


def validation_rows(real: VariantRecord, virt: VariantRecord) -> list[dict]:
    rows = []
    for a, b in zip(real.rounds, virt.rounds):
        rows.append({"variant": real.variant, "round": a.round, "clients": a.reported, "real_s": a.round_s,
                     "virtual_s": b.round_s, "error": (b.round_s - a.round_s) / a.round_s if a.round_s else None})
    return rows


def run(cfg: SimConfig, progress: Callable[[str, RoundRecord], None] | None = None) -> RunRecord:
    """Run ``cfg`` (every size of a sweep, every variant, every mode); returns the record (not yet written)."""
    cfg.validate()
    if cfg.run.training and cfg.run.aggregation == "fedbuff":   # asynchronous training: its own driver
        from . import asyncrun
        return asyncrun.run(cfg)
    record = RunRecord(config=cfg.to_dict())
    modes = ("real", "virtual") if cfg.run.mode == "both" else (cfg.run.mode,)
    sizes = cfg.run.sizes or (cfg.workload.clients_per_round,)
    _ = build(cfg.trace, max(cfg.workload.clients, *sizes), cfg.workload.seed)  # a bad trace fails before anything runs
    costs = None
    if "virtual" in modes:
        costs, record.calibration = costs_for(_specs(cfg), cfg.run.processes, cfg.run.threads,
                                              cfg.run.calibration_cache, cfg.run.calibration_pushes,
                                              "" if cfg.run.training else cfg.workload.model,
                                              cfg.run.check_exact)
    for size in sizes:
        w = replace(cfg.workload, clients_per_round=size,
                    population=max(cfg.workload.population, size) if cfg.workload.population else 0)
        sized = replace(cfg, workload=w)
        trace = build(cfg.trace, w.clients, w.seed)
        for variant in cfg.run.variants:
            for mode in modes:
                t0 = time.monotonic()
                cb = (lambda rr, m=mode, v=variant: progress(f"{m}/{v}/{size}", rr)) if progress else None
                if mode == "real":
                    rec = run_real_variant(sized, trace, variant, cb)
                else:
                    rec = run_virtual_variant(sized, trace, variant, costs, cb)
                    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
                    rec.notes.append(f"simulator peak RSS {rss:.0f} MiB")
                rec.wall_s = time.monotonic() - t0
                record.variants.append(rec)
            if len(modes) == 2:
                record.validation.extend(validation_rows(record.variants[-2], record.variants[-1]))
    return record
