import math

import pytest

from heteroswitch.bias import BiasSwitch, Mode, SwitchConfig, level_for


@pytest.mark.parametrize("loss,level,name", [
    (0.5, 0, "none"), (0.999, 0, "none"), (1.0, 1, "isp"), (1.2, 1, "isp"), (1.25, 2, "isp+swad"), (3.0, 2, "isp+swad"),
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
