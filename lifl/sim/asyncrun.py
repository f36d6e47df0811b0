"""``run.aggregation = "fedbuff"``: FedBuff and its synchronous baseline as ``lifl sim run`` variants.

Training mode on the trace's clock (:mod:`.fedbuff`): variant ``fedbuff`` aggregates in the
engine's float64 FedBuff (virtual mode) or in a real ``lifl serve``'s asynchronous job (real
mode); variant ``sync`` is synchronous FedAvg with the same concurrency on the same trace
(virtual: its aggregation is a float64 FedAvg in this process). Each published version (or
round) is a row of the record: ``round`` = version, ``start_s`` = when it was published on the
virtual clock, ``accuracy``, ``reported`` = updates folded into it so far.
"""
from __future__ import annotations

import time
import uuid
from . import training
from .config import SimConfig
from .fedbuff import Curve, Local, LiflFedBuff, ModelledFedBuff, fedbuff_spec, population, run_fedbuff, run_sync
from .records import RoundRecord, RunRecord, VariantRecord
from .traces import build
from .workload import examples, update_bytes


def _record(curve: Curve, mode: str, variant: str, conc: int, notes: list[str]) -> VariantRecord:
    rec = VariantRecord(mode=mode, variant=variant, notes=notes)
    for p in curve.points[1:]:
        rec.rounds.append(RoundRecord(round=p.step, selected=conc, reported=p.updates, available=conc, round_s=0.0,
                                      post_arrival_s=0.0, start_s=p.t, accuracy=p.accuracy))
    rec.counters = {"refused": dict(curve.refused), "accepted": len(curve.events) or curve.points[-1].updates,
                    "initial_accuracy": curve.points[0].accuracy}
    if curve.events:
        rec.counters["mean_staleness"] = sum(e.staleness for e in curve.events) / len(curve.events)
    return rec


def run(cfg: SimConfig) -> RunRecord:
    """Every mode of ``cfg`` for FedBuff, then the synchronous baseline (virtual), into one record."""
    w, r = cfg.workload, cfg.run
    task = training.load_task(r.task)
    trace = build(cfg.trace, w.clients, w.seed)
    pop = population(trace, examples(trace, w), update_bytes(task.SPECS))
    local = Local(task, w.seed, lr=r.learning_rate, epochs=r.local_epochs)
    conc = r.concurrency or w.clients_per_round
    spec = fedbuff_spec(conc, r.buffer_size, r.server_lr, r.staleness, r.staleness_exponent, r.max_staleness)
    record = RunRecord(config=cfg.to_dict())
    modes = ("real", "virtual") if r.mode == "both" else (r.mode,)
    clock = (f"virtual clock: each client's task takes its trace time (arrival + compute + upload), "
             f"{r.horizon_s:g} s simulated; server time not added")

    for mode in modes:
        t0 = time.monotonic()
        x0 = task.initial_model(w.seed)
        if mode == "virtual":
            curve = run_fedbuff(pop, local, ModelledFedBuff(spec, x0), concurrency=conc, buffer_size=r.buffer_size,
                                horizon_s=r.horizon_s, seed=w.seed)
            where = "aggregation: the engine's float64 FedBuff (lifl.engine.buffered.FedBuffModel)"
        else:
            from ..client import Client
            from .real import serve
            server = {"metrics_port": 0, "log_level": "warning", **cfg.server}
            server.setdefault("shm_prefix", f"liflsimfb{uuid.uuid4().hex[:6]}")
            with serve(server) as info, Client(info["address"]) as c:
                agg = LiflFedBuff(c, spec, x0)
                curve = run_fedbuff(pop, local, agg, concurrency=conc, buffer_size=r.buffer_size,
                                    horizon_s=r.horizon_s, seed=w.seed)
                agg.close()
            where = "aggregation: a real lifl serve's asynchronous job (pull latest, push deltas over gRPC)"
        rec = _record(curve, mode, "fedbuff", conc, [clock, where])
        rec.wall_s = time.monotonic() - t0
        record.variants.append(rec)
    t0 = time.monotonic()
    sync = run_sync(pop, local, concurrency=conc, horizon_s=r.horizon_s, server_lr=r.sync_server_lr,
                    over_selection=r.over_selection, seed=w.seed)
    rec = _record(sync, "virtual", "sync", conc,
                  [clock, f"sync: FedAvg rounds of {conc} clients, over-selection {r.over_selection:g}, "
                          f"server lr {r.sync_server_lr:g}; aggregation in float64 in the simulator"])
    rec.wall_s = time.monotonic() - t0
    record.variants.append(rec)
    return record
