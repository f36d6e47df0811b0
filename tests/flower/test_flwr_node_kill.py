"""A real SuperNode SIGKILLed mid-round (deployment mode, loopback): its update never reaches
LIFL, Flower's round timeout ends the round, the strategy closes the LIFL round on quorum, and
the model equals stock FedAvg's over the two surviving clients. LIFL leaks no shared memory."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from benchmarks.flower_stack import Stack, max_rel_diff  # noqa: E402
from lifl.shm import list_segments  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
NODES, VICTIM = 3, 2


def test_supernode_killed_mid_round_closes_on_quorum(tmp_path):
    prefix = f"liflkill{int(time.time() * 1000) % 10**8}"
    with Stack(tmp_path / "stack", extra_env={"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}) as st:
        st.start_lifl(shm_budget_mb=64, shm_prefix=prefix)
        st.start_superlink()
        st.start_supernodes(NODES)
        rc = {"num-server-rounds": 2, "min-nodes": NODES, "lifl-address": st.lifl_address, "model": "numpy-logreg",
              "fault-partition": VICTIM, "fault-round": 2}

        # reference: stock FedAvg where the same client fails in round 2
        ref = st.flwr_run(APP, {**rc, "lifl": False, "fault-kind": "raise", "round-timeout": 120.0,
                                "out": str(tmp_path / "stock")}, timeout=240)
        assert ref.returncode == 0, ref.stdout[-4000:]

        out = tmp_path / "lifl"
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(r=st.flwr_run(
            APP, {**rc, "lifl": True, "lifl-quorum": 0.6, "fault-kind": "hang", "round-timeout": 20.0,
                  "out": str(out)}, timeout=240)))
        runner.start()
        marker = out.with_suffix(".hang")
        deadline = time.monotonic() + 180
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the victim's ClientApp never started round 2"
        st.kill_supernode(VICTIM)           # the node and its ClientApp die mid-round
        runner.join(240)
        assert not runner.is_alive()
        r = result["r"]
        assert r.returncode == 0, r.stdout[-4000:]
        assert "with 2 of 3 updates (quorum 2)" in r.stdout, r.stdout[-4000:]
        assert max_rel_diff(tmp_path / "stock.npz", out.with_suffix(".npz")) <= 1e-6
        st.stop_lifl()
    assert list_segments(prefix) == []
