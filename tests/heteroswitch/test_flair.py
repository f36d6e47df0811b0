import json

import h5py
import numpy as np
import pytest

from heteroswitch.flair import FlairReader, decode_labels
from heteroswitch.metrics import average_precision


def _write_flair(path, with_metadata=False):
    """A small file in FLAIR's layout: /{partition}/{user_id}/images|labels|fine_grained_labels|image_ids."""
    rng = np.random.default_rng(0)
    users = {
        "train": {"u1": [b"animal|plant", b"animal", b""], "u2": [b"food"]},
        "test": {"u3": [b"plant|food", b"animal"]},
    }
    fine = {b"animal": b"dog", b"plant": b"tree", b"food": b"pizza", b"": b""}
    with h5py.File(path, "w") as f:
        for part, us in users.items():
            for uid, labs in us.items():
                g = f.create_group(f"{part}/{uid}")
                g.create_dataset("images", data=rng.integers(0, 256, (len(labs), 8, 8, 3), dtype=np.uint8))
                g.create_dataset("labels", data=np.array(labs, dtype=object), dtype=h5py.string_dtype("ascii"))
                fl = [b"|".join(fine[p] for p in lab.split(b"|")) for lab in labs]
                g.create_dataset("fine_grained_labels", data=np.array(fl, dtype=object), dtype=h5py.string_dtype("ascii"))
                g.create_dataset("image_ids", data=np.array([f"{uid}_{i}".encode() for i in range(len(labs))], dtype=object),
                                 dtype=h5py.string_dtype("ascii"))
        if with_metadata:
            f.create_dataset("metadata/label_mapping", data=json.dumps({"plant": 0, "food": 1, "animal": 2}))
    return path


def test_reader_on_generated_file(tmp_path):
    p = _write_flair(tmp_path / "flair.hdf5")
    with FlairReader(p, device_map={"u1": "GalaxyS9"}) as r:
        assert sorted(r.partitions()) == ["test", "train"]
        assert r.users("train") == ["u1", "u2"]
        assert r.label_vocab == {"animal": 0, "food": 1, "plant": 2}  # sorted union over the file
        assert r.fine_label_vocab == {"dog": 0, "pizza": 1, "tree": 2}
        u = r.read_user("train", "u1")
        assert u.images.shape == (3, 8, 8, 3) and u.images.dtype == np.uint8
        assert u.channels_first().shape == (3, 3, 8, 8)
        assert u.labels.tolist() == [[True, False, True], [True, False, False], [False, False, False]]
        assert u.fine_labels.tolist() == [[True, False, True], [True, False, False], [False, False, False]]
        assert u.image_ids == ["u1_0", "u1_1", "u1_2"] and u.device == "GalaxyS9" and len(u) == 3
        assert r.read_user("test", "u3").device is None
        assert r.users_by_device("train") == {"GalaxyS9": ["u1"], "unknown": ["u2"]}
        assert [x.user_id for x in r.iter_users("test")] == ["u3"]
        # FLAIR-style macro AP on the multi-hot labels works directly
        scores = u.labels.astype(float) * 0.9 + 0.05
        assert average_precision(scores, u.labels, "macro") == pytest.approx(1.0)


def test_reader_uses_metadata_mapping_and_device_map_file(tmp_path):
    p = _write_flair(tmp_path / "flair.hdf5", with_metadata=True)
    dm = tmp_path / "devices.json"
    dm.write_text(json.dumps({"u2": "Pixel5"}))
    with FlairReader(p, device_map=dm) as r:
        assert r.label_vocab == {"plant": 0, "food": 1, "animal": 2}
        assert "metadata" not in r.partitions()
        assert r.read_user("train", "u2").labels.tolist() == [[False, True, False]]
        assert r.read_user("train", "u2").device == "Pixel5"


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        FlairReader(tmp_path / "missing.hdf5")
    p = _write_flair(tmp_path / "flair.hdf5")
    with h5py.File(p, "a") as f:
        g = f.create_group("train/empty")
        g.create_dataset("images", data=np.zeros((0, 8, 8, 3), np.uint8))
        g.create_dataset("labels", data=np.array([], dtype=object), dtype=h5py.string_dtype("ascii"))
        g.create_dataset("image_ids", data=np.array([], dtype=object), dtype=h5py.string_dtype("ascii"))
        g = f.create_group("train/badshape")
        g.create_dataset("images", data=np.zeros((1, 3, 8, 8), np.uint8))
        g.create_dataset("labels", data=np.array([b"food"], dtype=object), dtype=h5py.string_dtype("ascii"))
        g.create_dataset("image_ids", data=np.array([b"x"], dtype=object), dtype=h5py.string_dtype("ascii"))
    with FlairReader(p) as r:
        with pytest.raises(ValueError, match="empty client"):
            r.read_user("train", "empty")
        with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
            r.read_user("train", "badshape")
        with pytest.raises(KeyError, match="partition 'val'"):
            r.users("val")
        with pytest.raises(KeyError, match="user 'nobody'"):
            r.read_user("train", "nobody")
    with pytest.raises(KeyError, match="not in the label vocabulary"):
        decode_labels([b"cat"], {"dog": 0})


def test_iter_users_yields_every_user_of_a_large_partition_once_in_file_order(tmp_path):
    """Many users (the membership index is built once per partition, not per user read)."""
    p = tmp_path / "many.hdf5"
    ids = [f"user{i:04d}" for i in range(600)]
    with h5py.File(p, "w") as f:
        for i, uid in enumerate(ids):
            g = f.create_group(f"train/{uid}")
            g.create_dataset("images", data=np.full((1, 2, 2, 3), i % 256, np.uint8))
            g.create_dataset("labels", data=np.array([b"food" if i % 2 else b"plant"], dtype=object),
                             dtype=h5py.string_dtype("ascii"))
            g.create_dataset("image_ids", data=np.array([uid.encode()], dtype=object), dtype=h5py.string_dtype("ascii"))
    with FlairReader(p, label_names=["food", "plant"]) as r:
        got = [(u.user_id, int(u.images[0, 0, 0, 0]), u.labels[0].tolist(), u.image_ids) for u in r.iter_users("train")]
        assert [g[0] for g in got] == sorted(ids) == r.users("train")
        assert all(px == i % 256 and lab == [i % 2 == 1, i % 2 == 0] and iid == [uid]
                   for i, (uid, px, lab, iid) in enumerate(got))
        listed = r.users("train")
        listed.clear()                      # the caller's copy: the reader's index is untouched
        assert r.read_user("train", ids[-1]).user_id == ids[-1] and len(r.users("train")) == 600
        with pytest.raises(KeyError, match="user 'user0600'"):
            r.read_user("train", "user0600")
        with pytest.raises(KeyError, match="partition 'val'"):
            next(r.iter_users("val"))
