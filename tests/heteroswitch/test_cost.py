"""Client cost: counted FLOPs against hand formulas, and what train_local reports per phase."""
import numpy as np
import pytest
import torch

from heteroswitch.bias import Mode
from heteroswitch.cost import PHASES, PhaseTimer, UnitCosts, count_flops, round_flops
from heteroswitch.models import make_model
from heteroswitch.swad import SWADConfig
from heteroswitch.trainer import TrainConfig, train_local


def test_matmul_and_conv_flops_match_the_formulas():
    lin = torch.nn.Linear(10, 5, bias=False)
    assert count_flops(lin, torch.rand(4, 10))[0] == 2 * 4 * 10 * 5
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, torch.rand(2, 3, 6, 6))[0] == 2 * (2 * 8 * 6 * 6) * (3 * 3 * 3)


def test_elementwise_ops_count_one_per_output_element_and_views_are_free():
    x = torch.rand(7, 3)
    n, _ = count_flops(lambda t: (t * 2 + 1).t().reshape(-1).clone(), x)
    assert n == 2 * 21


def test_round_flops_is_counts_times_units():
    u = UnitCosts(train_step=100, forward_sample=10, isp_image=3, swad_accumulate=7)
    f = round_flops(u, {"train_steps": 4, "probe_samples": 5, "probe_isp_images": 5, "isp_images": 32,
                        "swad_eval_samples": 8, "swad_accumulates": 6})
    assert f == {"sgd": 400, "probe": 50 + 15, "isp": 96, "swad_avg": 42, "swad_eval": 80, "total": 683}


def test_phase_timer_rejects_unknown_phase_and_sums_phases():
    t = PhaseTimer(torch.device("cpu"))
    with t.phase("isp"):
        pass
    s = t.seconds()
    assert set(s) == set(PHASES) | {"total"} and s["total"] == pytest.approx(sum(s[p] for p in PHASES))
    with pytest.raises(ValueError, match="unknown phase"):
        t.phase("coffee")


@pytest.fixture(scope="module")
def per_mode():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 3, 16, 16), dtype=np.uint8), rng.integers(0, 12, 16)
    cfg = TrainConfig(local_steps=4, batch_size=8, device="cpu", swad=SWADConfig(eval_every=2, eval_samples=8))
    out = {}
    for mode in (Mode(), Mode(isp=True), Mode(swad=True), Mode(True, True)):
        out[mode.name] = train_local(make_model(12, 8, (1, 1), seed=0), x, y, cfg, mode=mode, seed=1).metrics
    return out


def test_each_remedy_is_charged_in_its_own_phase(per_mode):
    none, isp, swad, both = per_mode["none"], per_mode["isp"], per_mode["swad"], per_mode["isp+swad"]
    assert len({m["flops_sgd"] for m in per_mode.values()}) == 1  # the same SGD steps for every method
    assert none["flops_isp"] == 0 and isp["flops_isp"] > 0 and both["flops_isp"] == isp["flops_isp"]
    assert isp["count_isp_images"] == 4 * 8
    assert swad["flops_swad_avg"] > 0 and swad["flops_swad_eval"] > 0 and none["flops_swad_eval"] == 0
    assert swad["count_swad_eval_samples"] == 2 * 8  # two valley losses (every 2 of 4 steps) on 8 samples
    for m in per_mode.values():
        assert m["flops_total"] == pytest.approx(sum(m[f"flops_{p}"] for p in PHASES))
        assert m["dev_s_total"] == pytest.approx(sum(m[f"dev_s_{p}"] for p in PHASES))
        assert all(m[f"dev_s_{p}"] >= 0 for p in PHASES)
    assert none["dev_s_isp"] == 0 and isp["dev_s_isp"] > 0 and swad["dev_s_swad_avg"] > 0


def test_a_training_step_costs_about_three_forward_passes(per_mode):
    """Backward ~ 2x forward: an independent sanity bound on the counted unit costs."""
    m = per_mode["swad"]
    fwd = m["flops_swad_eval"] / m["count_swad_eval_samples"]
    step_per_sample = m["flops_sgd"] / m["count_train_steps"] / 8
    assert 2.5 < step_per_sample / fwd < 3.6
