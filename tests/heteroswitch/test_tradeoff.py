"""The trade-off benchmark's pieces: per-client choice, colour-identity classes, sharpening, --scene."""
import numpy as np
import pytest
import torch

from heteroswitch.bias import BiasSwitch, Mode, SwitchConfig, choose_mode
from heteroswitch.cli import BENCHMARKS, build_parser, config_from_args, parse_scene_overrides
from heteroswitch.devices import list_devices, load_profile, render
from heteroswitch.isp import unsharp_mask
from heteroswitch.scenes import NUM_CLASSES, SceneConfig, make_federated_dataset

CFG = SwitchConfig(thresholds=(0.0, 0.5), colour_threshold=0.2)


@pytest.mark.parametrize("loss, colour, choice", [
    (0.9, 5.0, "none"),        # below the first threshold: nothing, whatever the colour signal
    (1.2, 0.1, "isp"),         # biased, ISP does not hurt the model here: colour cast -> ISP
    (1.2, 0.6, "swad"),        # biased, but ISP would destroy colour signal -> SWAD instead
    (1.8, -0.1, "isp+swad"),   # strongly biased, colour-insensitive -> both
    (1.8, 0.6, "swad"),
])
def test_per_client_choice_reaches_all_four_modes(loss, colour, choice):
    d = BiasSwitch(CFG).decide(loss, 1.0, colour)
    assert d.mode.name == choice
    assert d.as_metrics()["hs_signal"] == pytest.approx(loss - 1.0)


def test_colour_probe_runs_only_when_isp_is_at_stake():
    calls = []
    probe = lambda: calls.append(1) or 0.0  # noqa: E731
    d = BiasSwitch(CFG).decide(0.5, 1.0, probe)
    assert calls == [] and d.colour_signal is None and np.isnan(d.as_metrics()["hs_colour_signal"])
    d = BiasSwitch(CFG).decide(1.3, 1.0, probe)
    assert calls == [1] and d.colour_signal == 0.0 and "colour signal" in d.reason
    assert choose_mode(Mode(True, True), 0.3, None) == Mode(True, True)  # choice off: the level's mode
    with pytest.raises(ValueError, match="colour_threshold"):
        SwitchConfig(colour_threshold=-1.0)


def test_colour_pairs_share_a_shape_and_differ_in_identity_hue():
    sc = SceneConfig(colour_pairs=4, pair_hue_delta=0.05)
    lab = torch.arange(NUM_CLASSES)
    assert sc.shape_of(lab).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    h = sc.identity_hue(lab)
    assert torch.allclose((h[8:12] - h[0:4]) % 1.0, torch.full((4,), 0.05))
    # same generator state -> same geometry; the twins differ only where the foreground is
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    from heteroswitch.scenes import render_scenes
    a = render_scenes(torch.tensor([1]), sc, g1)
    b = render_scenes(torch.tensor([9]), sc, g2)
    assert (a - b).abs().max() > 0.1 and torch.allclose(a[..., :2, :2], b[..., :2, :2], atol=1e-3)  # corner: background
    with pytest.raises(ValueError, match="colour_pairs"):
        SceneConfig(colour_pairs=7)


def test_unsharp_mask_against_a_hand_computed_impulse():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    y = unsharp_mask(x, 2.0)
    assert y[0, 0, 2, 2].item() == pytest.approx(1 + 2.0 * (1 - 0.25))   # centre weight of the 3x3 binomial: 1/4
    assert y[0, 0, 2, 3].item() == pytest.approx(-2.0 * 0.125)            # edge neighbour weight 1/8
    assert y[0, 0, 1, 1].item() == pytest.approx(-2.0 * 0.0625)           # corner weight 1/16
    c = torch.full((2, 3, 6, 6), 0.4)
    assert torch.allclose(unsharp_mask(c, 3.0), c) and unsharp_mask(c, 0) is c


def test_tradeoff_profiles_have_different_kinds_of_bias():
    d = "datasets/devices/tradeoff"
    from heteroswitch.devices import profiles_dir
    pdir = profiles_dir() / "tradeoff"
    assert len(list_devices(pdir)) == 9
    p = {n: load_profile(n, pdir) for n in list_devices(pdir)}
    assert p["GalaxyS6"].isp.awb_bias[0] > 1.3 and p["G4"].isp.jpeg_quality <= 30 and p["Nexus5X"].isp.sharpen > 2
    assert p["GalaxyS22"].isp.sharpen == 0 and max(abs(b - 1) for b in p["GalaxyS22"].isp.awb_bias) < 0.1
    scene = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    import dataclasses
    flat = dataclasses.replace(p["Pixel5"], isp=dataclasses.replace(p["Pixel5"].isp, sharpen=0.0))
    a = render(scene, p["Pixel5"], 16, torch.Generator().manual_seed(1))
    b = render(scene, flat, 16, torch.Generator().manual_seed(1))
    assert (a - b).abs().max() > 0.01, d  # sharpening is applied


def test_tradeoff_benchmark_and_scene_overrides_from_the_cli(tmp_path):
    a = build_parser().parse_args(["bench", "--preset", "tiny", "--benchmark", "tradeoff",
                                   "--scene", "colour_pairs=5,pair_saturation=0.4:0.9", "--out", str(tmp_path)])
    cfg = config_from_args(a)
    assert cfg.data.profile_set == "tradeoff" and cfg.switch.colour_threshold == 0.2
    assert cfg.data.scene.colour_pairs == 5 and cfg.data.scene.pair_saturation == (0.4, 0.9)
    assert cfg.data.scene.pair_hue_delta == BENCHMARKS["tradeoff"]["scene"]["pair_hue_delta"]
    ds = make_federated_dataset(cfg.data, seed=0)
    assert {c.device for c in ds.clients} <= set(cfg.data.device_mix) and "G4" not in {c.device for c in ds.clients}
    # the benchmark's calibrated switch is the default; flags override it
    assert cfg.switch.thresholds == BENCHMARKS["tradeoff"]["switch"]["thresholds"]
    a = build_parser().parse_args(["bench", "--benchmark", "tradeoff", "--thresholds=-0.1,0.4", "--colour-threshold", "0.5"])
    assert config_from_args(a).switch.thresholds == (-0.1, 0.4) and config_from_args(a).switch.colour_threshold == 0.5
    assert config_from_args(build_parser().parse_args(["bench"])).switch.colour_threshold is None  # rev2: choice off
    off = build_parser().parse_args(["bench", "--benchmark", "tradeoff", "--colour-threshold", "off"])
    assert config_from_args(off).switch.colour_threshold is None
    for bad in ("colour_pairs", "nonsense=1", "colour_pairs=many"):
        with pytest.raises(ValueError, match="--scene"):
            parse_scene_overrides(bad)
