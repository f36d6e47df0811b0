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

from lifl.flower.testing import Stack, free_port, max_rel_diff  # noqa: E402

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
