import math

import pytest

from heteroswitch.bias import BiasSwitch, Mode, ServerReference, SwitchConfig, level_for


# Default thresholds are (-0.15, 0.5) (calibrated in the second benchmark revision, see bias.py / docs):
# signal < -0.15 -> none, -0.15 <= signal < 0.5 -> ISP, signal >= 0.5 -> ISP + SWAD.
@pytest.mark.parametrize("loss,level,name", [
    (0.5, 0, "none"), (0.84, 0, "none"), (0.86, 1, "isp"), (1.0, 1, "isp"), (1.49, 1, "isp"),
    (1.5, 2, "isp+swad"), (3.0, 2, "isp+swad"),
])
def test_default_thresholds_give_documented_modes(loss, level, name):
    d = BiasSwitch().decide(loss, server_ref=1.0)
    assert d.level == level and d.mode.name == name
    assert d.signal == pytest.approx(loss - 1.0)
    m = d.as_metrics()
    assert m["hs_level"] == level and m["hs_isp"] == float(level >= 1) and m["hs_swad"] == float(level >= 2)
    assert "signal" in d.reason and "level" in d.reason


def test_no_reference_uses_default_level_and_says_why():
    d = BiasSwitch(SwitchConfig(default_level=1)).decide(2.0, server_ref=None)
    assert d.level == 1 and d.signal is None and "no reference" in d.reason
    assert math.isnan(d.as_metrics()["hs_signal"]) and d.as_metrics()["hs_has_ref"] == 0.0


def test_ema_reference_compares_with_own_history():
    sw = BiasSwitch(SwitchConfig(reference="ema", ema_decay=0.5))
    assert sw.decide(1.0).level == 0  # first call: no history -> default
    d = sw.decide(1.5)  # ref = 1.0 -> signal 0.5 -> level 2
    assert d.loss_ref == 1.0 and d.level == 2
    assert sw.ema == pytest.approx(1.25)


def test_server_reference_falls_back_to_ema_when_missing():
    sw = BiasSwitch()
    sw.decide(2.0, server_ref=None)
    d = sw.decide(2.0, server_ref=None)
    assert d.loss_ref == pytest.approx(2.0) and d.level == 1 and "EMA" in d.reason


def test_custom_modes_and_levels():
    cfg = SwitchConfig(thresholds=(0.1,), modes=(Mode(), Mode(swad=True)))
    assert BiasSwitch(cfg).decide(1.05, 1.0).mode == Mode()
    assert BiasSwitch(cfg).decide(1.2, 1.0).mode == Mode(swad=True)
    assert level_for(0.3, (0.0, 0.25, 0.5)) == 2


def test_config_errors():
    with pytest.raises(ValueError, match="non-decreasing"):
        SwitchConfig(thresholds=(0.5, 0.1))
    with pytest.raises(ValueError, match="modes"):
        SwitchConfig(thresholds=(0.1,))
    with pytest.raises(ValueError, match="reference"):
        SwitchConfig(reference="peer")
    with pytest.raises(ValueError, match="hysteresis"):
        SwitchConfig(hysteresis=-0.1)
    with pytest.raises(ValueError, match="ref_statistic"):
        SwitchConfig(ref_statistic="mode")


def test_hysteresis_holds_level_just_below_threshold_then_drops():
    sw = BiasSwitch(SwitchConfig(thresholds=(0.0, 0.5), hysteresis=0.05))
    assert sw.decide(1.6, 1.0).level == 2
    d = sw.decide(1.47, 1.0)  # signal 0.47: below 0.5 but within 0.05 -> stays at 2
    assert d.level == 2 and "hysteresis" in d.reason
    assert sw.decide(1.40, 1.0).level == 1  # clearly below -> drops
    assert sw.decide(0.97, 1.0).level == 1  # -0.03 within 0.05 of 0.0 -> held at 1
    assert sw.decide(0.90, 1.0).level == 0
    # no hysteresis: plain thresholds
    sw0 = BiasSwitch(SwitchConfig(thresholds=(0.0, 0.5), hysteresis=0.0))
    sw0.decide(1.6, 1.0)
    assert sw0.decide(1.47, 1.0).level == 1


def test_hysteresis_never_raises_a_level():
    sw = BiasSwitch(SwitchConfig(thresholds=(0.0, 0.5), hysteresis=0.3))
    sw.decide(0.5, 1.0)  # level 0
    assert sw.decide(0.95, 1.0).level == 0  # -0.05 + 0.3 would reach level 1, but hysteresis only holds levels


def test_server_reference_is_weighted_median_smoothed_across_rounds():
    ref = ServerReference(SwitchConfig(ref_decay=0.5))
    assert ref.value is None
    # median of [1, 2, 10] = 2 (the outlier does not drag it up, unlike the mean 4.33)
    assert ref.update([1.0, 10.0, 2.0]) == pytest.approx(2.0)
    assert ref.update([4.0, 4.0, 4.0]) == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)
    assert ref.update([float("nan")]) == pytest.approx(3.0)  # nothing finite: unchanged
    w = ServerReference(SwitchConfig(ref_decay=0.0))
    assert w.update([1.0, 2.0, 3.0], weights=[1, 1, 10]) == pytest.approx(3.0)  # weighted median
    m = ServerReference(SwitchConfig(ref_decay=0.0, ref_statistic="mean"))
    assert m.update([1.0, 3.0], weights=[1, 3]) == pytest.approx(2.5)
