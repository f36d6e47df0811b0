import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heteroswitch import isp

PATTERNS = ["RGGB", "BGGR", "GRBG", "GBRG"]


def _img(n=2, h=8, w=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g, dtype=dtype)


def _srgb_decode_scalar(v: float) -> float:  # independent reference (IEC 61966-2-1)
    return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4


def test_neutral_parameters_are_identity():
    x = _img()
    assert torch.equal(isp.apply_white_balance(x, (1.0, 1.0, 1.0)), x)
    assert torch.equal(isp.apply_ccm(x, torch.eye(3)), x)
    assert torch.equal(isp.apply_gamma(x, 1.0), x)
    assert torch.equal(isp.apply_tone_curve(x, 0.0), x)
    assert torch.equal(isp.bin_downscale(x, 1), x)
    assert torch.equal(isp.resize(x, (8, 12)), x)
    assert torch.equal(isp.add_sensor_noise(x, 0.0, 0.0), x)
    # neutral random ISP: only the sRGB round trip remains
    neutral = isp.RandomISP(isp.RandomISPConfig(wb_range=(1.0, 1.0), gamma_range=(1.0, 1.0)))
    assert (neutral(x, torch.Generator().manual_seed(1)) - x).abs().max() <= 1e-5
    # forward ISP with neutral params (sRGB curve) inverts unprocess
    assert (isp.process(isp.unprocess(x)) - x).abs().max() <= 1e-5


def test_srgb_matches_reference_formula():
    v = torch.linspace(0, 1, 1001, dtype=torch.float64).reshape(1, 1, 1, -1)
    ref = torch.tensor([_srgb_decode_scalar(float(a)) for a in v.flatten()], dtype=torch.float64)
    assert torch.allclose(isp.srgb_to_linear(v).flatten(), ref, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_srgb_round_trip(dtype):
    # dense grid including both sides of the piecewise knees
    v = torch.cat([torch.linspace(0, 1, 20001), torch.tensor([0.04045, 0.0031308, 0.04044, 0.04046])]).to(dtype)
    x = v.reshape(1, 1, 1, -1)
    assert (isp.linear_to_srgb(isp.srgb_to_linear(x)) - x).abs().max() <= 1e-5
    assert (isp.srgb_to_linear(isp.linear_to_srgb(x)) - x).abs().max() <= 1e-5


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=64))
def test_srgb_round_trip_property(vals):
    x = torch.tensor(vals, dtype=torch.float32).reshape(1, 1, 1, -1)
    assert (isp.linear_to_srgb(isp.srgb_to_linear(x)) - x).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_ranges_kept(dtype):
    x = _img(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    outs = {
        "wb": isp.apply_white_balance(x, torch.tensor([[1.2, 1.0, 0.8]] * 2)),
        "ccm": isp.apply_ccm(x, torch.eye(3)),
        "gamma": isp.apply_gamma(x, torch.tensor([0.8, 1.5])),
        "tone": isp.apply_tone_curve(x, 0.5),
        "srgb": isp.linear_to_srgb(x),
        "demosaic": isp.demosaic_bilinear(isp.mosaic(x)),
        "jpeg": isp.jpeg_quantize(x, 50),
        "process": isp.process(x, (2.0, 1.0, 1.5), None, 2.2, 0.3),
        "random": isp.RandomISP(isp.RandomISPConfig(tone_range=(0, 0.5), noise_shot_max=0.01,
                                                    noise_read_max=0.01, jpeg_quality_range=(60, 90)))(x, g),
    }
    for name, y in outs.items():
        assert y.shape == x.shape, name
        assert y.dtype == dtype, name
    for name in ("tone", "srgb", "jpeg", "process", "random", "gamma"):
        assert outs[name].min() >= 0 and outs[name].max() <= 1, name
    assert isp.mosaic(x).shape == (2, 1, 8, 12)
    assert isp.bin_downscale(x, 2).shape == (2, 3, 4, 6)


def test_random_isp_is_seed_deterministic():
    x = _img(n=4)
    t = isp.RandomISP()
    a = t(x, torch.Generator().manual_seed(7))
    b = t(x, torch.Generator().manual_seed(7))
    c = t(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    n1 = isp.add_sensor_noise(x, 0.01, 0.01, torch.Generator().manual_seed(3))
    n2 = isp.add_sensor_noise(x, 0.01, 0.01, torch.Generator().manual_seed(3))
    assert torch.equal(n1, n2)


def test_random_isp_probability_zero_is_identity():
    x = _img()
    assert torch.equal(isp.RandomISP(isp.RandomISPConfig(p=0.0))(x, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mosaic_demosaic_constant_image_exact(pattern):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        for _ in range(10):
            c = torch.rand(1, 3, 1, 1, generator=g, dtype=torch.float64).to(dtype)
            x = c.expand(2, 3, 10, 14).clone()
            assert torch.equal(isp.demosaic_bilinear(isp.mosaic(x, pattern), pattern), x)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_mosaic_samples_the_right_channel(pattern):
    x = _img(n=1, h=4, w=4)
    raw = isp.mosaic(x, pattern)
    ch = {"R": 0, "G": 1, "B": 2}
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        assert torch.equal(raw[0, 0, dy::2, dx::2], x[0, ch[pattern[k]], dy::2, dx::2])


def test_demosaic_reproduces_linear_ramp_in_interior():
    yy, xx = torch.meshgrid(torch.arange(10, dtype=torch.float64), torch.arange(12, dtype=torch.float64), indexing="ij")
    x = torch.stack([0.01 * xx + 0.02 * yy, 0.03 * xx + 0.1, 0.5 - 0.01 * yy])[None]
    y = isp.demosaic_bilinear(isp.mosaic(x))
    assert (y - x)[..., 1:-1, 1:-1].abs().max() < 1e-12


def test_ccm_and_binning_match_numpy():
    x = _img(dtype=torch.float64)
    m = torch.tensor([[0.9, 0.1, 0.0], [0.05, 0.9, 0.05], [0.0, 0.2, 0.8]], dtype=torch.float64)
    ref = np.einsum("ck,nkhw->nchw", m.numpy(), x.numpy())
    assert np.allclose(isp.apply_ccm(x, m).numpy(), ref, atol=1e-12)
    b = x.numpy().reshape(2, 3, 4, 2, 6, 2).mean(axis=(3, 5))
    assert np.allclose(isp.bin_downscale(x, 2).numpy(), b, atol=1e-12)


def test_sensor_noise_variance_model():
    x = torch.full((1, 1, 256, 256), 0.25, dtype=torch.float64)
    y = isp.add_sensor_noise(x, shot=0.01, read=0.02, generator=torch.Generator().manual_seed(0))
    assert math.isclose(float((y - x).var()), 0.01 * 0.25 + 0.02**2, rel_tol=0.05)


def test_jpeg_quality_orders_error_and_dct_is_orthonormal():
    d = isp._dct_matrix()
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    x = _img(n=2, h=16, w=20, seed=3)
    e100 = (isp.jpeg_quantize(x, 100) - x).abs().mean()
    e50 = (isp.jpeg_quantize(x, 50) - x).abs().mean()
    e10 = (isp.jpeg_quantize(x, 10) - x).abs().mean()
    assert e100 < 0.01 < e10 and e100 < e50 < e10


def test_unprocess_inverts_process():
    x = _img(dtype=torch.float64) * 0.5  # stays unclipped after the gains below
    gains, ccm = (1.8, 1.0, 1.4), torch.tensor([[1.2, -0.1, -0.1], [-0.1, 1.2, -0.1], [0.0, -0.2, 1.2]], dtype=torch.float64)
    raw = isp.unprocess(x, gains, ccm)
    assert torch.allclose(isp.process(raw, gains, ccm), x, atol=1e-9)


def test_differentiable_ops_pass_gradients():
    x = _img()
    gains = torch.tensor([1.1, 1.0, 0.9], requires_grad=True)
    gamma = torch.tensor(1.3, requires_grad=True)
    y = isp.apply_gamma(isp.linear_to_srgb(isp.apply_white_balance(x, gains).clamp(0, 1)), gamma)
    y = isp.demosaic_bilinear(isp.mosaic(y))
    y.sum().backward()
    assert torch.isfinite(gains.grad).all() and gains.grad.abs().sum() > 0
    assert torch.isfinite(gamma.grad) and gamma.grad != 0


def test_bad_input_messages():
    with pytest.raises(ValueError, match="floating dtype"):
        isp.apply_white_balance(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (1, 1, 1))
    with pytest.raises(ValueError, match=r"channel\(s\) in dim 1"):
        isp.apply_ccm(torch.zeros(1, 4, 4, 3), torch.eye(3))
    with pytest.raises(ValueError, match="4-D batch"):
        isp.linear_to_srgb(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="torch.Tensor"):
        isp.srgb_to_linear(np.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="gains"):
        isp.apply_white_balance(torch.zeros(2, 3, 4, 4), torch.ones(3, 3))
    with pytest.raises(ValueError, match="CFA pattern"):
        isp.mosaic(torch.zeros(1, 3, 4, 4), "RGBG")
    with pytest.raises(ValueError, match="quality"):
        isp.jpeg_quantize(torch.zeros(1, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="wb_range"):
        isp.RandomISPConfig(wb_range=(0.0, 1.0))
