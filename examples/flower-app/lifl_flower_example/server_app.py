"""ServerApp: FedAvg, with LIFL doing the aggregation when run config `lifl = true`."""
from __future__ import annotations

import json
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from lifl.flower import LiflStrategy

from . import task

app = ServerApp()


def initial_arrays(model: str) -> ArrayRecord:
    if model.startswith("synthetic"):
        return ArrayRecord({k: Array(v) for k, v in task.synthetic_arrays(model, seed=1).items()})
    if model == "numpy-logreg":
        return ArrayRecord({k: Array(v) for k, v in task.logreg_init().items()})
    return ArrayRecord(task.make_net().state_dict())


def make_strategy(rc, n_min: int) -> FedAvg:
    """FedAvg, or FedAvgM / FedAdam (a server optimizer step on the weighted mean), per run config `strategy`."""
    common = dict(fraction_train=1.0, fraction_evaluate=float(rc["fraction-evaluate"]),
                  min_train_nodes=n_min, min_evaluate_nodes=n_min, min_available_nodes=n_min)
    name = str(rc["strategy"])
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=float(rc["server-lr"]),
                       server_momentum=float(rc["server-momentum"]))
    if name == "fedadam":
        return FedAdam(**common, eta=float(rc["server-lr"]))
    raise ValueError(f"run config strategy must be fedavg, fedavgm or fedadam, got {name!r}")


def run_async(grid: Grid, rc, model: str) -> None:
    """FedBuff, no rounds: `num-server-rounds` versions published, in LIFL (`lifl = true`) or here."""
    from lifl.engine.buffered import AsyncSpec, Staleness
    from lifl.engine.optimizers import ServerOptimizer
    from lifl.flower import AsyncFedBuff

    spec = AsyncSpec(buffer_size=int(rc["async-buffer"]), concurrency=int(rc["min-nodes"]),
                     max_staleness=int(rc["async-max-staleness"]),
                     staleness=Staleness(str(rc["async-staleness"]), float(rc["async-staleness-exponent"])),
                     optimizer=ServerOptimizer.of("sgd", lr=float(rc["server-lr"])),
                     keep_versions=int(rc["async-keep-versions"]))
    fb = AsyncFedBuff(spec, address=str(rc["lifl-address"]) if bool(rc["lifl"]) else None, job=str(rc["lifl-job"]),
                      client_address=str(rc["lifl-client-address"]) or None)
    t0 = time.time()
    result = fb.start(grid, initial_arrays(model), num_versions=int(rc["num-server-rounds"]),
                      train_config=ConfigRecord({"lr": float(rc["lr"])}), timeout=float(rc["round-timeout"]))
    out = str(rc["out"])
    if out:
        np.savez(out + ".npz", **OrderedDict((k, v.numpy()) for k, v in result.arrays.items()))
        with open(out + ".json", "w") as f:
            json.dump({"lifl": bool(rc["lifl"]), "async": True, "version": result.version,
                       "seconds": time.time() - t0, "events": result.events}, f, indent=1)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    model = str(rc["model"])
    if bool(rc.get("async", False)):
        run_async(grid, rc, model)
        return
    n_min = int(rc["min-nodes"])
    inner = make_strategy(rc, n_min)
    strategy = inner
    if bool(rc["lifl"]):
        strategy = LiflStrategy(inner, address=str(rc["lifl-address"]), job=str(rc["lifl-job"]),
                                client_address=str(rc["lifl-client-address"]) or None,
                                quorum=float(rc["lifl-quorum"]), pull_model=bool(rc["lifl-pull"]))

    marks: list[tuple[int, float]] = []

    def mark(server_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
        marks.append((server_round, time.time()))    # called before round 1 and after every round
        return None

    t0 = time.time()
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(model),
                            num_rounds=int(rc["num-server-rounds"]), timeout=float(rc["round-timeout"]),
                            train_config=ConfigRecord({"lr": float(rc["lr"])}), evaluate_fn=mark)
    out = str(rc["out"])
    if out:
        final = OrderedDict((k, v.numpy()) for k, v in result.arrays.items())
        np.savez(out + ".npz", **final)
        summary = {
            "lifl": bool(rc["lifl"]), "pull": bool(rc["lifl-pull"]), "model": model,
            "seconds": time.time() - t0,
            "round_marks": marks,
            "round_seconds": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
            "train_metrics": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "last_round_detail": getattr(strategy, "last_round_detail", ""),
        }
        with open(out + ".json", "w") as f:
            json.dump(summary, f, indent=1)
    if isinstance(strategy, LiflStrategy):
        strategy.close()
