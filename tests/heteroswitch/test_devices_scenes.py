import dataclasses
import json

import numpy as np
import pytest
import torch

from heteroswitch import devices, isp
from heteroswitch.scenes import (NUM_CLASSES, FederatedConfig, SceneConfig, load_dataset, make_federated_dataset,
                                 render_scenes, save_dataset)

TINY = FederatedConfig(num_clients=10, samples_per_client=6, test_per_class=1, image_size=16,
                       scene=SceneConfig(base_size=32))


def test_all_nine_profiles_load():
    assert devices.list_devices() == sorted(devices.DEVICE_NAMES)
    profs = devices.load_profiles()
    assert list(profs) == list(devices.DEVICE_NAMES)
    assert {p.vendor for p in profs.values()} == {"Samsung", "LG", "Google"}
    assert {p.tier for p in profs.values()} == {"high", "mid", "low"}
    for p in profs.values():
        assert p.notes.startswith("ASSUMPTION")


def test_unknown_profile_is_a_clear_key_error():
    with pytest.raises(KeyError, match="unknown device profile 'iPhone15'.*GalaxyS22"):
        devices.load_profile("iPhone15")


def test_malformed_profile(tmp_path):
    (tmp_path / "Bad.json").write_text(json.dumps({"name": "Bad", "vendor": "x", "tier": "low", "year": 1}))
    with pytest.raises(ValueError, match="malformed device profile 'Bad'"):
        devices.load_profile("Bad", tmp_path)


def _neutral_profile():
    return devices.DeviceProfile(
        name="Neutral", vendor="none", tier="ideal", year=0,
        sensor=devices.SensorParams(spectral_matrix=((1, 0, 0), (0, 1, 0), (0, 0, 1))),
        isp=devices.ISPParams(),
    )


def test_ideal_device_on_flat_patches_is_plain_srgb_encoding():
    # an ideal sensor + ISP maps linear radiance to its sRGB encoding (demosaic is exact on flat patches)
    lin = torch.rand(4, 3, 1, 1, dtype=torch.float64).expand(4, 3, 16, 16).clone()
    out = devices.render(lin, _neutral_profile(), 16)
    assert torch.allclose(out, isp.linear_to_srgb(lin), atol=1e-9)


def test_render_shapes_determinism_and_device_differences():
    scene = render_scenes(torch.arange(12), SceneConfig(base_size=32), torch.Generator().manual_seed(0))
    assert scene.shape == (12, 3, 32, 32) and scene.min() >= 0 and scene.max() <= 1
    profs = devices.load_profiles()
    outs = {}
    for name, p in profs.items():
        a = devices.render(scene, p, 16, torch.Generator().manual_seed(1))
        b = devices.render(scene, p, 16, torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        assert a.shape == (12, 3, 16, 16) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
        outs[name] = a
    # different phones render the same scene differently (that is the point)
    assert (outs["GalaxyS22"] - outs["Pixel5"]).abs().mean() > 0.01
    assert (outs["GalaxyS22"] - outs["GalaxyS6"]).abs().mean() > 0.01


def test_federated_dataset_structure_and_determinism(tmp_path):
    ds = make_federated_dataset(TINY, seed=3)
    assert len(ds.clients) == 10
    assert all(c.device != "G4" for c in ds.clients)  # unseen device gets no training client
    assert set(ds.test) == set(devices.DEVICE_NAMES)
    labels = [y for _, y in ds.test.values()]
    assert all(np.array_equal(labels[0], y) for y in labels)  # paired test scenes
    for c in ds.clients:
        assert c.images.shape == (6, 3, 16, 16) and c.images.dtype == np.uint8
        assert c.labels.min() >= 0 and c.labels.max() < NUM_CLASSES
    again = make_federated_dataset(TINY, seed=3)
    assert all(np.array_equal(a.images, b.images) for a, b in zip(ds.clients, again.clients))
    save_dataset(ds, tmp_path / "d.npz")
    back = load_dataset(tmp_path / "d.npz")
    assert [c.client_id for c in back.clients] == [c.client_id for c in ds.clients]
    assert all(np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
               for a, b in zip(ds.clients, back.clients))
    assert back.unseen_device == "G4" and all(np.array_equal(back.test[d][0], ds.test[d][0]) for d in ds.test)


def test_device_mix_is_respected():
    cfg = dataclasses.replace(TINY, num_clients=20, device_mix={"GalaxyS22": 3, "Pixel5": 1})
    ds = make_federated_dataset(cfg, seed=0)
    devs = [c.device for c in ds.clients]
    assert devs.count("GalaxyS22") == 15 and devs.count("Pixel5") == 5


def test_label_skew_alpha():
    skewed = make_federated_dataset(dataclasses.replace(TINY, samples_per_client=40, alpha=0.05), seed=0)
    flat = make_federated_dataset(dataclasses.replace(TINY, samples_per_client=40, alpha=100.0), seed=0)
    distinct = lambda ds: np.mean([len(np.unique(c.labels)) for c in ds.clients])  # noqa: E731
    assert distinct(skewed) < distinct(flat)


def test_bad_partition_configs():
    with pytest.raises(ValueError, match="empty client"):
        make_federated_dataset(dataclasses.replace(TINY, samples_per_client=0))
    with pytest.raises(KeyError, match="unknown device profile 'Lumia'"):
        make_federated_dataset(dataclasses.replace(TINY, device_mix={"Lumia": 1.0}))
    with pytest.raises(ValueError, match="unseen device"):
        make_federated_dataset(dataclasses.replace(TINY, device_mix={"G4": 1.0}))
