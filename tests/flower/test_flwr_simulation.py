"""`flwr run` in simulation mode (Ray backend, 4 SuperNodes, 3 rounds, the example's PyTorch model):
LIFL's result equals stock FedAvg's, with the model sent through the SuperLink and pulled from LIFL."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")
pytest.importorskip("ray")

from benchmarks.flower_stack import Stack, max_rel_diff  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
NODES, ROUNDS = 4, 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("flwr-sim"), extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}) as st:
        st.start_lifl(shm_budget_mb=64)
        st.start_superlink(simulation=True)
        yield st


def run(stack: Stack, out: Path, **cfg) -> dict:
    rc = {"num-server-rounds": ROUNDS, "min-nodes": NODES, "lifl-address": stack.lifl_address, "out": str(out),
          "model": "mlp", **cfg}
    r = stack.flwr_run_simulation(APP, rc, num_supernodes=NODES, produces=out.with_suffix(".npz"), timeout=240)
    assert r.returncode == 0, r.stdout[-4000:]
    assert out.with_suffix(".npz").exists(), r.stdout[-4000:] + stack.log("superlink")[-4000:]
    return json.loads(out.with_suffix(".json").read_text())


def test_simulation_lifl_equals_stock_fedavg(stack, tmp_path):
    stock = run(stack, tmp_path / "stock", lifl=False)
    lifl = run(stack, tmp_path / "lifl", lifl=True)
    pull = run(stack, tmp_path / "pull", lifl=True, **{"lifl-pull": True})
    assert len(stock["round_seconds"]) == len(lifl["round_seconds"]) == ROUNDS
    assert max_rel_diff(tmp_path / "stock.npz", tmp_path / "lifl.npz") <= 1e-6
    assert max_rel_diff(tmp_path / "stock.npz", tmp_path / "pull.npz") <= 1e-6
    # metrics aggregated as FedAvg would (weighted mean of train_loss)
    for r in map(str, range(1, ROUNDS + 1)):
        for other in (lifl, pull):
            assert other["train_metrics"][r]["train_loss"] == pytest.approx(stock["train_metrics"][r]["train_loss"],
                                                                              rel=1e-5)
    assert "all 4 expected updates arrived" in lifl["last_round_detail"]
