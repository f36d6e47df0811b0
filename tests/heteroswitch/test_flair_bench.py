"""FLAIR end to end on a small file written in FLAIR's exact layout (as its prepare_dataset.py writes it)."""
import json
from collections import Counter

import h5py
import numpy as np
import pytest

from heteroswitch.cli import main
from heteroswitch.flair import FlairReader, decode_labels
from heteroswitch.flair_bench import FlairConfig, hash_device, load_flair_dataset
from heteroswitch.scenes import FederatedConfig

LABELS = ["animal", "food", "plant", "structure", "vehicle"]
FINE = {"animal": ["dog", "cat"], "food": ["pizza"], "plant": ["tree"], "structure": ["house"], "vehicle": ["car"]}


def write_flair(path, users=(("train", 8), ("val", 1), ("test", 2)), n_img=6, size=16, seed=0):
    """/{partition}/{user_id}/labels|fine_grained_labels|image_ids as dtype 'S' '|'-joined strings, images
    (N, H, W, 3) uint8, /metadata/label_counter and fine_grained_label_counter as JSON {label: count}."""
    rng = np.random.default_rng(seed)
    lc, fc = Counter(), Counter()
    with h5py.File(path, "w") as h:
        for part, nu in users:
            for u in range(nu):
                uid = f"{part}{u:03d}"
                labs, fls, imgs = [], [], []
                for _ in range(n_img):
                    ls = sorted(rng.choice(LABELS, size=int(rng.integers(1, 3)), replace=False).tolist())
                    fl = [str(rng.choice(FINE[x])) for x in ls]
                    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                    if "animal" in ls:
                        img[: size // 2] += 150  # something to learn
                    labs.append("|".join(ls))
                    fls.append("|".join(fl))
                    imgs.append(img)
                    lc.update(ls)
                    fc.update(fl)
                h[f"/{part}/{uid}/labels"] = np.asarray(labs, dtype="S")
                h[f"/{part}/{uid}/fine_grained_labels"] = np.asarray(fls, dtype="S")
                h[f"/{part}/{uid}/image_ids"] = np.asarray([f"{uid}_{i}" for i in range(n_img)], dtype="S")
                h.create_dataset(f"/{part}/{uid}/images", data=np.stack(imgs))
        h["/metadata/label_counter"] = json.dumps(lc)
        h["/metadata/fine_grained_label_counter"] = json.dumps(fc)
    return path


@pytest.fixture(scope="module")
def flair_file(tmp_path_factory):
    return write_flair(tmp_path_factory.mktemp("flair") / "flair.hdf5")


def test_reader_takes_flairs_label_counter_as_the_vocabulary(flair_file):
    with FlairReader(flair_file) as r:
        assert r.label_vocab == {n: i for i, n in enumerate(sorted(LABELS))}
        assert r.fine_label_vocab == {n: i for i, n in enumerate(sorted({f for v in FINE.values() for f in v}))}


def test_hash_device_is_deterministic_and_follows_the_mix():
    mix = FederatedConfig().device_mix
    ids = [f"user{i}" for i in range(20000)]
    got = Counter(hash_device(u, mix) for u in ids)
    assert [hash_device(u, mix) for u in ids[:50]] == [hash_device(u, mix) for u in ids[:50]]
    assert "G4" not in got  # weight 0: never drawn
    tot = sum(mix.values())
    for d, w in mix.items():
        assert abs(got.get(d, 0) / len(ids) - w / tot) < 0.015, d


def test_unrendered_dataset_keeps_the_files_images_and_labels(flair_file, tmp_path):
    users = [f"train{u:03d}" for u in range(8)]
    dmap = {u: ("GalaxyS9" if i % 2 else "Pixel5") for i, u in enumerate(users[:6])}  # two users unmapped
    dmap.update({"test000": "GalaxyS9", "test001": "G4"})
    (tmp_path / "map.json").write_text(json.dumps(dmap))
    ds = load_flair_dataset(FlairConfig(str(flair_file), device_map=str(tmp_path / "map.json"), image_size=16,
                                        render=False, unseen_device="G4"))
    assert [c.client_id for c in ds.clients] == users[:6] and ds.num_classes == len(LABELS)
    with h5py.File(flair_file) as h:
        for c in ds.clients:
            g = h[f"train/{c.client_id}"]
            assert c.device == dmap[c.client_id]
            assert np.array_equal(c.images, g["images"][()].transpose(0, 3, 1, 2))  # same size: unchanged
            assert np.array_equal(c.labels.astype(bool), decode_labels(g["labels"][()], {n: i for i, n in
                                                                                         enumerate(sorted(LABELS))}))
    assert set(ds.test) == {"GalaxyS9", "G4"} and len(ds.test["G4"][1]) == 6


def test_bad_flair_inputs_say_what_is_wrong(flair_file, tmp_path):
    bad = tmp_path / "not.hdf5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="HDF5"):
        load_flair_dataset(FlairConfig(str(bad)))
    (tmp_path / "m.json").write_text(json.dumps({"train000": "Lumia950"}))
    with pytest.raises(KeyError, match="Lumia950"):
        load_flair_dataset(FlairConfig(str(flair_file), device_map=str(tmp_path / "m.json")))
    assert main(["bench", "--flair", str(tmp_path / "missing.hdf5")]) == 2


def test_bench_runs_end_to_end_on_a_flair_file(flair_file, tmp_path):
    """Multi-label training (BCE) and FLAIR's AP per simulated device, through the real CLI."""
    rc = main(["bench", "--preset", "tiny", "--flair", str(flair_file), "--seeds", "0", "--methods", "heteroswitch",
               "--colour-threshold", "0.2", "--aggregator", "local", "--flair-test-images", "8", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    job = doc["jobs"][0]
    assert doc["config"]["flair"]["path"] == str(flair_file)
    assert len(job["final"]["per_device"]) == 9  # the same test photos shot through every phone
    for d, m in job["final"]["per_device"].items():
        assert 0.0 < m["ap_macro"] <= 1.0 and np.isnan(m["accuracy"]), d  # multi-label: AP, no accuracy
    assert job["compute"]["flops_total"] > 0 and len(job["switch_log"]) == 2 * 3
    # the cost of every client-round, and the job's totals are their sums
    assert len(job["cost_log"]) == 2 * 3
    assert sum(r[3] for r in job["cost_log"]) == pytest.approx(job["compute"]["flops_total"])
    assert (tmp_path / "pareto.md").is_file() and (tmp_path / "pareto_gflop.png").stat().st_size > 0


def test_multi_hot_labels_train_with_binary_cross_entropy():
    import torch

    from heteroswitch.models import make_model
    from heteroswitch.trainer import measure_loss, predict
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 2, (6, 5)).astype(np.uint8)
    m = make_model(5, 8, (1, 1), seed=0)
    z = predict(m, x, torch.device("cpu")).astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))  # independent reference
    assert measure_loss(m, x, y, torch.device("cpu"))[0] == pytest.approx(bce, rel=1e-5)
