"""ClientApp: trains a small PyTorch model (or sends fixed random arrays in the synthetic modes).

The LIFL mod is always installed: it acts only on train messages a LiflStrategy
configured, so the run config switch `lifl` alone decides whether LIFL aggregates.
"""
from __future__ import annotations

import os
import time

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lifl.flower import lifl_mod

from . import task

app = ClientApp(mods=[lifl_mod])

_synthetic_cache: dict = {}


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def _maybe_fail(context: Context, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    rc = context.run_config
    if int(rc.get("fault-partition", -1)) != _partition(context) or int(rc.get("fault-round", 0)) != server_round:
        return arrays
    kind = str(rc.get("fault-kind", "raise"))
    if kind == "raise":
        raise RuntimeError(f"injected fault: partition {_partition(context)} fails in round {server_round}")
    if kind == "exit":
        os._exit(3)
    if kind == "hang":     # say so in <out>.hang, then never answer (a test kills this node meanwhile)
        with open(str(rc.get("out", "")) + ".hang", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(float(rc.get("fault-hang-s", 300.0)))
        raise RuntimeError(f"injected hang of partition {_partition(context)} ended without the node being killed")
    if kind == "layout":   # drop the last row of the first tensor: a layout LIFL must refuse
        items = list(arrays.items())
        k0, a0 = items[0]
        return ArrayRecord({k0: type(a0)(a0.numpy()[:-1]), **dict(items[1:])})
    raise ValueError(f"unknown fault-kind {kind!r}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid = _partition(context)
    server_round = int(msg.content["config"]["server-round"])
    model = str(rc.get("model", "mlp"))
    if model.startswith("synthetic"):
        if model not in _synthetic_cache:   # one fixed random update per ClientApp process
            _synthetic_cache.clear()
            _synthetic_cache[model] = ArrayRecord(
                {k: Array(v) for k, v in task.synthetic_arrays(model, seed=100 + pid).items()})
        arrays = _synthetic_cache[model]
        metrics = {"train_loss": 0.0, "num-examples": 100 + pid}
    elif model == "numpy-logreg":
        x, y = task.load_data(pid)
        params, loss = task.logreg_train(
            {k: v.numpy() for k, v in msg.content["arrays"].items()}, x, y,
            lr=float(msg.content["config"].get("lr", rc.get("lr", 0.05))), steps=int(rc.get("local-steps", 5)),
            batch_size=int(rc.get("batch-size", 16)), seed=int(rc.get("seed", 0)) * 1000 + pid * 10 + server_round)
        arrays = ArrayRecord({k: Array(v) for k, v in params.items()})
        metrics = {"train_loss": loss, "num-examples": len(x), "partition": pid}
    else:
        net = task.make_net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = task.load_data(pid)
        loss = task.train(net, x, y, lr=float(msg.content["config"].get("lr", rc.get("lr", 0.05))),
                          steps=int(rc.get("local-steps", 5)), batch_size=int(rc.get("batch-size", 16)),
                          seed=int(rc.get("seed", 0)) * 1000 + pid * 10 + server_round)
        arrays = ArrayRecord(net.state_dict())
        metrics = {"train_loss": loss, "num-examples": len(x)}
    arrays = _maybe_fail(context, server_round, arrays)
    time.sleep(float(rc.get("delay-per-partition-s", 0.0)) * pid)   # nodes of different speeds
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid = _partition(context)
    if str(rc.get("model", "mlp")) != "mlp":
        metrics = {"eval_loss": 0.0, "eval_acc": 0.0, "num-examples": 1}
    else:
        net = task.make_net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = task.load_data(pid)
        loss, acc = task.evaluate(net, x, y)
        metrics = {"eval_loss": loss, "eval_acc": acc, "num-examples": len(x)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
