import numpy as np
import pytest
import torch

from heteroswitch.bias import BiasSwitch, Mode
from heteroswitch.models import make_model
from heteroswitch.swad import SWADConfig
from heteroswitch.trainer import TrainConfig, evaluate_devices, load_numpy_state, measure_loss, train_local

CFG = TrainConfig(local_steps=4, batch_size=8, device="cpu", swad=SWADConfig(eval_every=1, eval_samples=8))


def _data(n=20, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, 12, n)


def _model(seed=0):
    return make_model(12, width=8, blocks=(1, 1), seed=seed)


def test_model_is_deterministic_and_uses_groupnorm():
    a, b = _model(1), _model(1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in a.modules())
    assert all(v.is_floating_point() for v in a.state_dict().values())  # nothing integer to average
    assert a(torch.rand(2, 3, 16, 16)).shape == (2, 12)


@pytest.mark.parametrize("mode", [Mode(), Mode(isp=True), Mode(swad=True), Mode(True, True)])
def test_train_local_returns_arrays_and_accounts_compute(mode):
    x, y = _data()
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = train_local(m, x, y, CFG, mode=mode, seed=1)
    assert r.num_examples == 20
    assert set(r.state) == set(before) and all(r.state[k].shape == tuple(before[k].shape) for k in before)
    assert any(not np.array_equal(r.state[k], before[k].numpy()) for k in before)
    mt = r.metrics
    assert all(np.isfinite(v) for v in mt.values())
    assert mt["train_samples"] == 4 * 8
    assert mt["isp_images"] == (32 if mode.isp else 0)
    assert mt["eval_samples"] == (4 * 8 if mode.swad else 0)  # one valley loss per step on 8 samples
    assert mt["compute_units"] == 3 * mt["train_samples"] + mt["eval_samples"]
    assert mt["mode_isp"] == float(mode.isp) and mt["mode_swad"] == float(mode.swad)
    if mode.swad:
        assert mt["swad_segments"] == 4


def test_train_local_is_seed_deterministic():
    x, y = _data()
    a = train_local(_model(), x, y, CFG, mode=Mode(True, True), seed=5).state
    b = train_local(_model(), x, y, CFG, mode=Mode(True, True), seed=5).state
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_switch_path_reports_decision():
    x, y = _data()
    m = _model()
    loss0, _ = measure_loss(m, x, y, "cpu")
    r = train_local(m, x, y, CFG, switch=BiasSwitch(), server_ref=loss0 / 2, seed=0)  # signal = +1 -> level 2
    assert r.metrics["hs_level"] == 2 and r.metrics["mode_swad"] == 1
    assert r.metrics["hs_loss_global"] == pytest.approx(loss0, rel=1e-5)
    assert r.metrics["eval_samples"] == 20 + 4 * 8  # the bias probe is counted too


def test_bad_client_data():
    x, y = _data()
    with pytest.raises(ValueError, match="empty client"):
        train_local(_model(), x[:0], y[:0], CFG)
    with pytest.raises(ValueError, match="channels-last"):
        train_local(_model(), x.transpose(0, 2, 3, 1), y, CFG)
    with pytest.raises(ValueError, match="uint8"):
        train_local(_model(), x.astype(np.int32), y, CFG)
    with pytest.raises(ValueError, match="labels"):
        train_local(_model(), x, y[:5], CFG)
    with pytest.raises(KeyError, match="lacks tensors"):
        load_numpy_state(_model(), {})


def test_evaluate_devices_metrics_are_finite_and_bounded():
    x, y = _data(24)
    out = evaluate_devices(_model(), {"A": (x, y), "B": (x[:12], y[:12])}, "cpu")
    for d in out.values():
        assert 0 <= d["ap_macro"] <= 1 and 0 <= d["ap_micro"] <= 1 and 0 <= d["accuracy"] <= 1
        assert np.isfinite(d["loss"])
