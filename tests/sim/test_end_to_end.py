"""Tiny real and virtual runs end to end through `lifl sim run` / `lifl sim report` (real server, real pool)."""
from __future__ import annotations

import json
import uuid

import pytest

from lifl.cli import main
from lifl.sim.config import SimConfigError, load
from lifl.shm import list_segments


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """One calibration cache for this module's runs: measured once (same pool settings), then reused."""
    return tmp_path_factory.mktemp("calibration")


def test_tiny_real_and_virtual_run_with_report(tmp_path, capsys, calib):
    prefix = f"liflsimtest{uuid.uuid4().hex[:6]}"
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f"""
[workload]
clients_per_round = 24
rounds = 2
model = "dense:5000"
dropout = 0.25
[trace]
kind = "uniform"
window_s = 0.5
[run]
mode = "both"
variants = ["lifl", "serverful"]
calibration_pushes = 16
calibration_cache = "{calib}"
[server]
shm_prefix = "{prefix}"
""")
    out = tmp_path / "out"
    assert main(["sim", "run", "--config", str(cfg), "-o", str(out), "--no-progress"]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["workload"]["clients_per_round"] == 24 and rec["machine"]["cpus"] >= 1
    by = {(v["mode"], v["variant"]): v for v in rec["variants"]}
    assert set(by) == {("real", "lifl"), ("virtual", "lifl"), ("real", "serverful"), ("virtual", "serverful")}
    for (mode, variant), v in by.items():
        assert len(v["rounds"]) == 2
        for r in v["rounds"]:
            # dropouts are decided from the seed: both modes see the same clients report
            assert r["selected"] == 24 and 0 < r["reported"] < 24
            assert r["refused"] == {"dropped_out": 24 - r["reported"]}
            if mode == "real":  # LIFL is exact; Flower's aggregate() sums in float32
                assert r["max_rel_error"] is not None
                assert r["max_rel_error"] <= (1e-6 if variant == "lifl" else 1e-2)
    for k in (1, 2):
        reps = {v["rounds"][k - 1]["reported"] for v in rec["variants"]}
        weights = {round(v["rounds"][k - 1]["total_weight"], 6) for v in rec["variants"]}
        assert len(reps) == 1 and len(weights) == 1
    assert len(rec["validation"]) == 4 and all(x["real_s"] > 0 and x["virtual_s"] > 0 for x in rec["validation"])
    assert rec["calibration"]["costs"]["ingest_Bps"] > 0 and rec["calibration"]["costs"]["cold_start_s"] > 0
    md = (out / "report.md").read_text()
    assert "| real | lifl | 24 | 2 |" in md and "Virtual against real" in md and "MB between processes" in md
    assert (out / "aggregators_vs_arrivals.png").stat().st_size > 0 and (out / "round_time_and_cpu.png").exists()
    # re-render elsewhere from the JSON alone
    again = tmp_path / "again"
    assert main(["sim", "report", str(out / "run.json"), "-o", str(again)]) == 0
    assert (again / "report.md").read_text() == md.replace(str(out), str(again))
    assert list_segments(prefix) == []
    capsys.readouterr()


def test_training_mode_in_virtual_time_learns(tmp_path, capsys, calib):
    out = tmp_path / "out"
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f'[run]\ncalibration_pushes = 16\ncalibration_cache = "{calib}"\n')
    assert main(["sim", "run", "--config", str(cfg), "--mode", "virtual", "--training", "--clients", "20",
                 "--rounds", "4", "--trace", "straggler", "-o", str(out), "--no-progress"]) == 0
    rec = json.loads((out / "run.json").read_text())
    acc = [r["accuracy"] for r in rec["variants"][0]["rounds"]]
    assert len(acc) == 4 and acc[-1] > 0.3 and acc[-1] > acc[0] - 0.02  # better than chance (0.1)
    clock = [r["start_s"] + r["round_s"] for r in rec["variants"][0]["rounds"]]
    assert clock == sorted(clock) and clock[0] > 0.5  # stragglers take ~1 s of training before they upload
    assert (out / "accuracy.png").exists()
    capsys.readouterr()


def test_real_mode_on_the_ray_runtime(tmp_path, capsys):
    prefix = f"liflsimray{uuid.uuid4().hex[:6]}"
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f'[workload]\nclients_per_round = 40\nmodel = "dense:20000"\n[run]\nmode = "real"\n'
                   f'[server]\nruntime = "ray"\nshm_prefix = "{prefix}"\n')
    out = tmp_path / "out"
    assert main(["sim", "run", "--config", str(cfg), "-o", str(out), "--no-progress"]) == 0
    v = json.loads((out / "run.json").read_text())["variants"][0]
    r = v["rounds"][0]
    assert v["server"]["runtime"] == "ray" and r["reported"] == 40 and r["max_rel_error"] <= 1e-6
    assert v["cpu"]["functions"] > 0  # the Ray actors folded, as the server's descendants
    assert list_segments(prefix) == []
    capsys.readouterr()


def test_training_mode_for_real_pulls_trains_and_pushes(tmp_path, capsys):
    prefix = f"liflsimtrain{uuid.uuid4().hex[:6]}"
    out = tmp_path / "out"
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f'[server]\nshm_prefix = "{prefix}"\n')
    assert main(["sim", "run", "--config", str(cfg), "--mode", "real", "--training", "--clients", "16",
                 "--rounds", "3", "-o", str(out), "--no-progress"]) == 0
    rounds = json.loads((out / "run.json").read_text())["variants"][0]["rounds"]
    # each round's model is the exact FedAvg of what the clients trained from the previous one
    assert all(r["max_rel_error"] <= 1e-6 and r["reported"] == 16 for r in rounds)
    acc = [r["accuracy"] for r in rounds]
    assert acc[-1] > 0.3 and acc[-1] >= acc[0] - 0.02
    assert list_segments(prefix) == []
    capsys.readouterr()


TASK = '''
import numpy as np
SPECS = [("w", (3,), "float32")]
def initial_model(seed):
    return {"w": np.zeros(3, np.float32)}
def local_train(model, seed, client, num_examples, *, lr, epochs):
    return {"w": model["w"] + np.float32(1.0)}   # every client moves every weight by one
def accuracy(model, seed):
    return float(model["w"][0])
'''


def test_a_users_training_task_runs_in_both_modes(tmp_path, monkeypatch, capsys, calib):
    (tmp_path / "mytask.py").write_text(TASK)
    (tmp_path / "halftask.py").write_text("SPECS = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the client processes import it too
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f'[run]\ntask = "mytask"\ncalibration_pushes = 16\ncalibration_cache = "{calib}"\n'
                   f'[server]\nshm_prefix = "liflsimtask{uuid.uuid4().hex[:6]}"\n')
    out = tmp_path / "out"
    assert main(["sim", "run", "--config", str(cfg), "--mode", "both", "--training", "--clients", "6",
                 "--rounds", "2", "-o", str(out), "--no-progress"]) == 0
    for v in json.loads((out / "run.json").read_text())["variants"]:
        # FedAvg of "previous + 1" from every client is previous + 1, whatever the weights
        assert [r["accuracy"] for r in v["rounds"]] == [1.0, 2.0], v["mode"]
    capsys.readouterr()
    with pytest.raises(SimConfigError, match="lacks initial_model, local_train, accuracy"):
        load(None, {"run.training": True, "run.task": "halftask"})
    with pytest.raises(SimConfigError, match="cannot import 'no_such_task'"):
        load(None, {"run.training": True, "run.task": "no_such_task"})


def test_engine_ablations_run_for_real(tmp_path, capsys):
    """lazy, no_reuse and no_shm are engine settings: each runs a real server, exact, and shows its mechanism
    in the server's own /metrics (fresh functions only; update bytes sent over the functions' sockets)."""
    prefix = f"liflsimabl{uuid.uuid4().hex[:6]}"
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f'[workload]\nclients_per_round = 10\nmodel = "dense:2000"\n'
                   f'[trace]\nkind = "uniform"\nwindow_s = 0.3\n'
                   f'[run]\nmode = "real"\nvariants = ["lazy", "no_reuse", "no_shm"]\nprocesses = 1\n'
                   f'[server]\nshm_prefix = "{prefix}"\n')
    out = tmp_path / "out"
    assert main(["sim", "run", "--config", str(cfg), "-o", str(out), "--no-progress"]) == 0
    by = {v["variant"]: v for v in json.loads((out / "run.json").read_text())["variants"]}
    for name, v in by.items():
        assert [r["reported"] for r in v["rounds"]] == [10], name
        assert all(r["max_rel_error"] <= 1e-6 for r in v["rounds"]), name
    assert by["lazy"]["server"]["fold_when"] == "lazy"
    c = by["no_reuse"]["counters"]
    assert c["lifl_warm_reuses_total"] == 0 and c["lifl_cold_starts_total"] >= 2  # a leaf, then a top
    assert by["no_shm"]["counters"]["lifl_pipe_bytes_total"] == 10 * 8000
    assert by["no_shm"]["bytes_between_processes"] == 2 * 10 * 8000   # client -> gateway -> function
    assert list_segments(prefix) == []
    capsys.readouterr()
