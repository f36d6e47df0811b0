"""`flwr run` (simulation, 4 SuperNodes of different speeds) with the asynchronous FedBuff ServerApp and
LIFL: no round barrier, deltas pushed by lifl_mod straight to LIFL. Every published version equals an
independent float64 replay of FedBuff over the updates LIFL accepted (recomputed from what each node
received), fast nodes contribute more often than slow ones, and slow ones arrive stale."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from benchmarks.flower_stack import Stack  # noqa: E402
from lifl.client import Client  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
NODES, K, VERSIONS, SERVER_LR, A = 4, 2, 6, 0.9, 0.5
LR, STEPS, BATCH, SEED = 0.05, 5, 16, 0


def test_async_fedbuff_under_flwr_run(tmp_path):
    sys.path.insert(0, str(APP))
    from lifl_flower_example import task

    out = tmp_path / "async"
    rc = {"async": True, "lifl": True, "model": "numpy-logreg", "min-nodes": NODES, "num-server-rounds": VERSIONS,
          "async-buffer": K, "async-staleness": "polynomial", "async-staleness-exponent": A,
          "async-keep-versions": VERSIONS + 8, "server-lr": SERVER_LR, "delay-per-partition-s": 0.3,
          "lr": LR, "local-steps": STEPS, "batch-size": BATCH, "seed": SEED, "lifl-job": "fedbuff",
          "out": str(out), "round-timeout": 120.0}
    with Stack(tmp_path / "stack", extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}) as st:
        st.start_lifl(shm_budget_mb=64)
        st.start_superlink(simulation=True)
        rc["lifl-address"] = st.lifl_address
        r = st.flwr_run_simulation(APP, rc, num_supernodes=NODES, produces=out.with_suffix(".json"), timeout=150)
        assert r.returncode == 0 and out.with_suffix(".json").exists(), r.stdout[-4000:] + st.log("superlink")[-3000:]
        summary = json.loads(out.with_suffix(".json").read_text())
        with Client(st.lifl_address) as c:
            info = c.job_info("fedbuff")
            published = {v: c.pull_version(v, job="fedbuff")[1] for v in range(summary["version"] + 1)}

    print("ServerApp seconds", summary["seconds"], "events", len(summary["events"]))
    assert summary["version"] >= VERSIONS and info.mode == "async"
    last = summary["version"]
    accepted = [e for e in summary["events"] if e["outcome"] == "accepted" and e["version"] <= last]
    by_partition = Counter(int(e["metrics"]["partition"]) for e in accepted)
    assert by_partition[0] > by_partition[3], by_partition          # the fast node trains more often
    assert any(e["staleness"] > 0 for e in accepted)                 # slow nodes return to a newer model
    # the final model the ServerApp returned is LIFL's latest version
    with np.load(out.with_suffix(".npz")) as z:
        for k in ("w", "b"):
            np.testing.assert_array_equal(z[k], published[last][k])

    # replay: x_b = x_{b-1} + η·Σ w·s(τ)·Δ / Σ w over the K updates LIFL put in buffer b, each Δ recomputed
    # from the version its node received; s(τ) = ((1+τ̄)/(1+τ))^a with τ̄ = (concurrency-1)/K
    mean_tau = (NODES - 1) / K
    x = {k: np.asarray(v, np.float64) for k, v in task.logreg_init().items()}
    for k in x:
        np.testing.assert_array_equal(published[0][k], x[k].astype(np.float32))
    for b in range(1, last + 1):
        members = [e for e in accepted if e["version"] == b]
        assert len(members) == K, (b, members)
        num = {k: np.zeros_like(v) for k, v in x.items()}
        wsum = 0.0
        for e in members:
            base, tau, pid = e["base"], e["staleness"], int(e["metrics"]["partition"])
            assert 0 <= tau <= b - 1 - base
            got = {k: np.asarray(v) for k, v in published[base].items()}
            xs, ys = task.load_data(pid)
            trained, _ = task.logreg_train(got, xs, ys, lr=LR, steps=STEPS, batch_size=BATCH,
                                           seed=SEED * 1000 + pid * 10 + base + 1)
            w = float(len(xs))
            assert e["weight"] == w
            s = ((1 + mean_tau) / (1 + tau)) ** A
            for k in x:
                delta = (trained[k].astype(np.float64) - got[k].astype(np.float64)).astype(np.float32)
                num[k] += w * s * delta.astype(np.float64)
            wsum += w
        x = {k: x[k] + SERVER_LR * num[k] / wsum for k in x}
        for k in x:
            np.testing.assert_allclose(published[b][k], x[k], rtol=1e-6, atol=1e-7, err_msg=f"version {b}, {k}")
