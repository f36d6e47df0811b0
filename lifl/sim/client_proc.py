"""One process of the real mode's client pool: pushes many virtual clients' updates over gRPC.

Spoken to over stdin/stdout in JSON lines (no pickle between processes): first
an init object, then one object per round; each round's float64 reference sum
Σ wᵢxᵢ of the updates this process pushed is written as ``.npy`` files, for
the driver's exactness check. Clients wait for their trace time (compute and
upload delays are emulated by sleeping: loopback has no bandwidth to speak of).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..client import Client, RpcFailure
from ..layout import Layout
from . import training
from .workload import base_model, client_update


def _round(client: Client, init: dict, cmd: dict, base: dict) -> dict:
    seed, training_mode = init["seed"], init["training"]
    task = training.load_task(init["task"]) if training_mode else None
    rid, sim_round, t0 = cmd["round"], cmd["sim_round"], cmd["t0"]
    ref = None if not init["check"] else {k: np.zeros(v.shape, np.float64) for k, v in base.items()}
    lock = threading.Lock()
    lat, refused, total = [], {}, [0.0]
    model = client.pull(rid, initial=True) if training_mode else base
    cpu0 = time.process_time()

    def one(item):
        idx, delay, weight = item
        wait = t0 + delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if training_mode:
            up = task.local_train(model, seed, int(idx), int(weight), lr=init["lr"], epochs=init["epochs"])
        else:
            up = client_update(base, seed, sim_round, int(idx))
        t = time.monotonic()
        try:
            client.push(rid, up, float(weight), client_id=f"c{idx}")
        except RpcFailure as e:
            with lock:
                refused[e.code.name] = refused.get(e.code.name, 0) + 1
            return
        done = time.monotonic()
        with lock:
            lat.append((t - t0, done - t0))
            total[0] += float(weight)
            if ref is not None:
                for k, v in up.items():
                    ref[k] += float(weight) * v.astype(np.float64)

    with ThreadPoolExecutor(init["threads"]) as pool:
        list(pool.map(one, cmd["items"]))
    out = {"pushed": len(lat), "weight": total[0], "refused": refused, "push_times": lat, "cpu_s": time.process_time() - cpu0}
    if ref is not None:
        d = Path(init["tmpdir"]) / f"ref-{init['index']}-{sim_round}"
        d.mkdir(parents=True, exist_ok=True)
        names = list(ref)
        for i, k in enumerate(names):
            np.save(d / f"{i}.npy", ref[k], allow_pickle=False)
        out["ref"] = {"dir": str(d), "names": names}
    return out


def main() -> int:
    init = json.loads(sys.stdin.readline())
    specs = [(s.name, s.shape, s.dtype) for s in Layout.from_wire(init["specs"]).specs]
    base = base_model(specs, init["seed"])
    with Client(init["address"], retry_s=init.get("retry_s", 120.0)) as client:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("op") == "exit":
                break
            try:
                reply = _round(client, init, cmd, base)
            except Exception as e:  # loud, and the driver sees it
                reply = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
