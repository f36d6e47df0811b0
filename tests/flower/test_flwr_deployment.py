"""Deployment mode: a real `flower-superlink --insecure`, 3 real `flower-supernode --insecure`
processes and a LIFL server, all on loopback, driven by `flwr run`. Equality with stock FedAvg,
the pull-from-LIFL option, and the failure cases (a client failing mid-round, a reply with a wrong
tensor layout, LIFL unreachable from the clients)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from benchmarks.flower_stack import Stack, free_port, max_rel_diff  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
NODES, ROUNDS = 3, 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("flwr-dep"), extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}) as st:
        st.start_lifl(shm_budget_mb=64)
        st.start_superlink()
        st.start_supernodes(NODES)
        yield st


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("flwr-dep-out")


def run(stack: Stack, out: Path, **cfg) -> tuple[dict, str]:
    rc = {"num-server-rounds": ROUNDS, "min-nodes": NODES, "lifl-address": stack.lifl_address, "out": str(out),
          "model": "numpy-logreg", "round-timeout": 120.0, **cfg}
    r = stack.flwr_run(APP, rc, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    assert out.with_suffix(".npz").exists(), r.stdout[-4000:] + stack.log("superlink")[-4000:]
    return json.loads(out.with_suffix(".json").read_text()), r.stdout


FAULT = {"fault-partition": 2, "fault-round": 2}


def test_deployment_lifl_equals_stock_fedavg(stack, outdir):
    run(stack, outdir / "stock", lifl=False)
    summary, log = run(stack, outdir / "lifl", lifl=True)
    assert max_rel_diff(outdir / "stock.npz", outdir / "lifl.npz") <= 1e-6
    assert "all 3 expected updates arrived" in summary["last_round_detail"]
    assert log.count("LIFL round") >= ROUNDS


def test_deployment_pull_model_from_lifl(stack, outdir):
    run(stack, outdir / "pull", lifl=True, **{"lifl-pull": True})
    assert max_rel_diff(outdir / "stock.npz", outdir / "pull.npz") <= 1e-6


@pytest.mark.parametrize("strategy,extra", [("fedavgm", {"server-momentum": 0.9}),
                                             ("fedadam", {"server-lr": 0.05})])
def test_server_optimizer_strategies_step_from_lifls_mean(stack, outdir, strategy, extra):
    """FedAvgM / FedAdam wrapped: LIFL computes the mean, the strategy's server step runs on it.
    Flower's FedAdam turns a float32 model into float64; the wrapper keeps the clients' float32
    (a LIFL round's layout is its model's), so for it only the values are compared."""
    cfg = {"strategy": strategy, **extra}
    run(stack, outdir / f"stock-{strategy}", lifl=False, **cfg)
    summary, log = run(stack, outdir / f"lifl-{strategy}", lifl=True, **{"lifl-pull": True}, **cfg)
    assert log.count("LIFL round") >= ROUNDS and "all 3 expected updates arrived" in summary["last_round_detail"]
    assert len(summary["train_metrics"]) == ROUNDS
    assert max_rel_diff(outdir / f"stock-{strategy}.npz", outdir / f"lifl-{strategy}.npz",
                        same_dtypes=strategy != "fedadam") <= 1e-6
    if not (outdir / "stock.npz").exists():
        run(stack, outdir / "stock", lifl=False)
    # the server step moved the model away from plain FedAvg's
    assert max_rel_diff(outdir / "stock.npz", outdir / f"lifl-{strategy}.npz") > 1e-3


def test_client_failing_mid_round_closes_on_quorum(stack, outdir):
    run(stack, outdir / "stock-fault", lifl=False, **FAULT, **{"fault-kind": "raise"})
    summary, log = run(stack, outdir / "lifl-fault", lifl=True, **FAULT, **{"fault-kind": "raise", "lifl-quorum": 0.6})
    assert "injected fault" in log
    assert "with 2 of 3 updates (quorum 2)" in log            # LIFL closed round 2 on quorum
    assert max_rel_diff(outdir / "stock-fault.npz", outdir / "lifl-fault.npz") <= 1e-6
    assert not np.allclose(np.load(outdir / "stock.npz")["w"], np.load(outdir / "lifl-fault.npz")["w"])


def test_wrong_tensor_layout_is_an_error_reply(stack, outdir):
    summary, log = run(stack, outdir / "lifl-layout", lifl=True, **FAULT,
                       **{"fault-kind": "layout", "lifl-quorum": 0.6})
    assert "LIFL INVALID_ARGUMENT" in log                     # the gateway's refusal reached the ServerApp
    assert "with 2 of 3 updates (quorum 2)" in log
    # the bad update was refused, not folded: same result as if that client had failed
    assert max_rel_diff(outdir / "stock-fault.npz", outdir / "lifl-layout.npz") <= 1e-6


def test_lifl_unreachable_from_clients_is_an_error_reply(stack, outdir):
    dead = f"127.0.0.1:{free_port()}"
    summary, log = run(stack, outdir / "lifl-down", lifl=True, **{"num-server-rounds": 1, "lifl-client-address": dead})
    assert log.count("LIFL UNAVAILABLE") >= NODES             # every client's failure is reported, none dropped
    assert "Received 0 results" in log or "0 updates in LIFL round" in log
    assert "produced no model" in log
