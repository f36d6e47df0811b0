import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heteroswitch.aggregate import lifl_available
from heteroswitch.bench import config_from_dict, config_to_dict, summarize
from heteroswitch.cli import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[2]
LIFL_OK, LIFL_WHY = lifl_available()


def _tiny(tmp_path, *extra):
    return config_from_args(build_parser().parse_args(
        ["bench", "--preset", "tiny", "--seeds", "0", "--out", str(tmp_path), *extra]))


def test_config_round_trips_through_json(tmp_path):
    cfg = _tiny(tmp_path, "--thresholds", "0.1,0.3")
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_bad_cli_config_is_reported():
    from heteroswitch.cli import main
    assert main(["bench", "--methods", "fedavg,magic"]) == 2
    assert main(["bench", "--unseen-device", "Lumia"]) == 2


def _check_outputs(out: Path, methods):
    doc = json.loads((out / "results.json").read_text())
    assert [j["method"] for j in doc["jobs"]] == methods
    for j in doc["jobs"]:
        s = j["final"]["summary"]["ap_macro"]
        assert all(math.isfinite(s[k]) for k in ("mean", "var", "worst", "unseen"))
        assert len(j["final"]["per_device"]) == 9 and j["history"]
        assert j["compute"]["compute_units"] > 0
    for f in ("table.md", "per_device_ap.png", "variance_over_rounds.png"):
        assert (out / f).stat().st_size > 0
    return doc


def test_tiny_bench_end_to_end_via_module_entry_point(tmp_path):
    """`python -m heteroswitch bench` runs the whole pipeline; the metrics are finite (not a goal check)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    methods = ["fedavg", "isp_swad", "heteroswitch"]
    r = subprocess.run([sys.executable, "-m", "heteroswitch", "bench", "--preset", "tiny", "--seeds", "0",
                        "--methods", ",".join(methods), "--aggregator", "local", "--out", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = _check_outputs(tmp_path, methods)
    assert "Goal check" in (tmp_path / "table.md").read_text()
    assert set(doc["summary"]["goal"]) >= {"variance_reduction_pct", "compute_ratio_vs_isp_swad", "all_met"}
    # the adaptive switch never costs more than always-on ISP+SWAD (same steps, fewer valley evaluations)
    t = doc["summary"]["table"]
    assert t["heteroswitch"]["compute_units"]["mean"] <= t["isp_swad"]["compute_units"]["mean"] + 12 * 3 * 2


@pytest.mark.skipif(not LIFL_OK, reason=f"lifl.client cannot be imported: {LIFL_WHY}")
def test_tiny_bench_aggregates_through_lifl(tmp_path, server):
    """The bench aggregates through a LIFL server the caller started; one LIFL job per (seed, method)."""
    from heteroswitch.bench import run_bench
    cfg = _tiny(tmp_path, "--methods", "fedavg,heteroswitch", "--aggregator", "lifl", "--lifl-address", server.address)
    run_bench(cfg, log=lambda *_: None)
    doc = _check_outputs(tmp_path, ["fedavg", "heteroswitch"])
    assert {j["aggregator"] for j in doc["jobs"]} == {"lifl"}


def test_lifl_aggregator_without_an_address_is_refused_before_any_work(tmp_path, capsys):
    from heteroswitch.cli import main
    assert main(["bench", "--preset", "tiny", "--seeds", "0", "--aggregator", "lifl", "--out", str(tmp_path)]) == 2
    assert "--lifl-address" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())   # nothing rendered or written


def test_cosine_lr_schedule_and_constant():
    import dataclasses

    from heteroswitch.bench import BenchConfig, round_lr
    from heteroswitch.trainer import TrainConfig
    cfg = BenchConfig(rounds=11, train=TrainConfig(lr=0.1), lr_min_frac=0.1)
    assert round_lr(cfg, 1) == pytest.approx(0.1)
    assert round_lr(cfg, 6) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    assert round_lr(cfg, 11) == pytest.approx(0.01)
    assert all(round_lr(cfg, r) >= round_lr(cfg, r + 1) for r in range(1, 11))
    assert round_lr(dataclasses.replace(cfg, lr_schedule="constant"), 11) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        BenchConfig(lr_schedule="step")


def test_tail_uses_every_evaluation_of_the_last_tail_rounds():
    from heteroswitch.bench.report import tail_history as _tail_history
    hist = [{"round": r} for r in (5, 10, 15, 16, 17, 18, 19, 20)]
    assert [h["round"] for h in _tail_history({"history": hist, "tail_rounds": 5})] == [16, 17, 18, 19, 20]
    assert [h["round"] for h in _tail_history({"history": hist})] == [18, 19, 20]  # old result files: last 3


def test_summarize_goal_arithmetic():
    def job(method, var, mean, worst, unseen, cu):
        s = {"mean": mean, "var": var, "worst": worst, "unseen": unseen}
        return {"method": method, "final": {"summary": {"ap_macro": s, "ap_micro": s, "accuracy": s},
                                            "per_device": {"A": {"ap_macro": mean}}},
                "compute": {"compute_units": cu, "train_seconds": cu, "isp_on": 1, "swad_on": 1, "client_rounds": 2},
                "history": [{"round": 1, "per_device_ap": {"A": mean}}]}
    jobs = [job("fedavg", 0.010, 0.80, 0.70, 0.72, 100), job("heteroswitch", 0.009, 0.795, 0.72, 0.73, 90),
            job("isp_swad", 0.009, 0.79, 0.71, 0.73, 120)]
    summary = summarize(jobs, "A")
    g = summary["goal"]
    assert summary["table_tail"]["fedavg"]["ap_mean"]["mean"] == pytest.approx(0.80)
    assert g["variance_reduction_pct"] == pytest.approx(10.0)
    assert g["mean_ap_delta_points"] == pytest.approx(-0.5)
    assert g["worst_higher"] and g["unseen_higher"] and g["switch_cheaper_than_always_on"]
    assert g["compute_ratio_vs_isp_swad"] == pytest.approx(0.75) and g["all_met"]
