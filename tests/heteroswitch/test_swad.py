import pytest
import torch

from heteroswitch.swad import SWAD, SWADConfig, ValleyDetector, WeightAverager


def _run(losses, n_c, n_t, r):
    det = ValleyDetector(n_c, n_t, r)
    inc = []
    for v in losses:
        inc += det.observe(v)
    inc += det.finish()
    return det, inc


def test_fall_plateau_rise_gives_hand_computed_valley():
    # segments 0..3 fall; windows of 3 first have their min first at t=6 -> start c=4,
    # threshold = mean(1.0, 1.2, 1.1) * 1.3 = 1.43.  Segment k is kept while
    # min(L[k..k+2]) <= 1.43: k=4..8 (min 1.0, 1.1, 1.1, 1.25, 1.25); k=9 -> min(2,3,4)=2 -> dead.
    losses = [5, 4, 3, 2, 1.0, 1.2, 1.1, 1.3, 1.25, 2.0, 3.0, 4.0]
    det, inc = _run(losses, 3, 3, 0.3)
    assert det.converged and det.dead
    assert det.start == 4 and det.end == 8
    assert inc == [4, 5, 6, 7, 8]
    assert det.threshold == pytest.approx(1.43)


def test_plateau_converges_immediately_and_flushes_to_the_end():
    # ties -> first index is the argmin, so convergence at t=2 with c=0, threshold 1.3
    det, inc = _run([1.0] * 5, 3, 3, 0.3)
    assert det.converged and not det.dead
    assert (det.start, det.end) == (0, 4)
    assert inc == [0, 1, 2, 3, 4]


def test_rise_converges_at_start_then_dies():
    # window [1,2,3] -> c=0, threshold 2*1.3=2.6; k=0: min 1 ok; k=1: min(2,3,4)=2 ok; k=2: min(3,4,5)=3 dead
    det, inc = _run([1, 2, 3, 4, 5], 3, 3, 0.3)
    assert det.converged and det.dead
    assert (det.start, det.end) == (0, 1)
    assert inc == [0, 1]


def test_never_converges():
    det, inc = _run([5, 4, 3, 2, 1], 3, 6, 0.3)
    assert not det.converged and not det.dead
    assert det.start is None and det.end is None and inc == []


def test_final_flush_uses_truncated_windows_and_stops_at_first_failure():
    # n_c=2: window [1, 1.05] at t=2 -> c=1, threshold 1.025*1.1 = 1.1275.
    # online (n_t=4): k=1 decided at t=4: min(1,1.05,1.5,1.2)=1 -> in.
    # flush: k=2: min(1.05,1.5,1.2)=1.05 in; k=3: min(1.5,1.2)=1.2 > 1.1275 -> stop.
    det, inc = _run([2, 1, 1.05, 1.5, 1.2], 2, 4, 0.1)
    assert inc == [1, 2]
    assert (det.start, det.end) == (1, 2)


def test_reference_defaults():
    c = SWADConfig()
    assert (c.n_converge, c.n_tolerance, c.tolerance_ratio) == (3, 6, 0.3)


def test_weight_averager_is_arithmetic_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).double(),
               "n": torch.tensor(i)} for i in range(7)]
    avg = WeightAverager()
    for s in states:
        avg.add(s)
    out = avg.average()
    assert torch.allclose(out["w"].float(), torch.stack([s["w"] for s in states]).mean(0), atol=1e-7)
    assert torch.allclose(out["b"], torch.stack([s["b"] for s in states]).mean(0), atol=1e-15)
    assert int(out["n"]) == 6  # integer buffers keep the last value
    # merging two partial averagers gives the same mean
    a1, a2 = WeightAverager(), WeightAverager()
    for s in states[:3]:
        a1.add(s)
    for s in states[3:]:
        a2.add(s)
    a1.merge(a2)
    assert torch.allclose(a1.average()["w"], out["w"], atol=1e-12)


def _drive(losses, config, steps_per_segment=2):
    """Run SWAD on a 1-parameter model whose iterate i has weight i; return (model weight, report)."""
    model = torch.nn.Linear(1, 1, bias=False)
    swad = SWAD(config)
    i = 0
    for v in losses:
        for _ in range(steps_per_segment):
            with torch.no_grad():
                model.weight.fill_(float(i))
            swad.on_step(model)
            i += 1
        swad.on_checkpoint(v)
    rep = swad.finalize(model)
    return float(model.weight.detach()), rep


def test_swad_averages_exactly_the_iterates_of_the_valley():
    # valley = segments 4..8 (see above) -> iterates 8..17 -> mean 12.5
    w, rep = _drive([5, 4, 3, 2, 1.0, 1.2, 1.1, 1.3, 1.25, 2.0, 3.0, 4.0],
                    SWADConfig(n_converge=3, n_tolerance=3, tolerance_ratio=0.3))
    assert w == pytest.approx(12.5)
    assert rep["swad_start"] == 4 and rep["swad_end"] == 8 and rep["swad_iterates_averaged"] == 10
    assert rep["swad_fallback"] == 0


def test_swad_fallback_tail_and_last():
    losses = [5, 4, 3, 2, 1]  # never converges; 10 iterates 0..9
    w, rep = _drive(losses, SWADConfig(n_converge=3, n_tolerance=6, fallback="tail"))
    assert w == pytest.approx((4 + 5 + 6 + 7 + 8 + 9) / 6)  # last 3 segments
    assert rep["swad_fallback"] == 1 and rep["swad_converged"] == 0
    w, rep = _drive(losses, SWADConfig(fallback="last"))
    assert w == 9.0 and rep["swad_fallback"] == 2


def test_bn_policy_keep_last_keeps_running_stats():
    model = torch.nn.BatchNorm1d(2)
    swad = SWAD(SWADConfig(n_converge=1, n_tolerance=1, bn_policy="keep_last"))
    for i in range(3):
        with torch.no_grad():
            model.weight.fill_(float(i))
            model.running_mean.fill_(float(10 * i))
        swad.on_step(model)
        swad.on_checkpoint(1.0)
    swad.finalize(model)
    assert float(model.weight.detach()[0]) == pytest.approx(1.0)
    assert float(model.running_mean[0]) == 20.0


def test_config_validation():
    with pytest.raises(ValueError, match="fallback"):
        SWADConfig(fallback="mean")
    with pytest.raises(ValueError, match="bn_policy"):
        SWADConfig(bn_policy="freeze")
    with pytest.raises(RuntimeError, match="on_step"):
        SWAD().on_checkpoint(1.0)
