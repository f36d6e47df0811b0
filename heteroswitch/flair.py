"""Reader for FLAIR's HDF5 layout (Apple's Federated Learning Annotated Image Repository).

Layout (as written by FLAIR's ``prepare_dataset.py``)::

    /{partition}/{user_id}/images               (N, H, W, 3) uint8
    /{partition}/{user_id}/labels               (N,) byte strings, coarse labels joined by "|"
    /{partition}/{user_id}/fine_grained_labels  (N,) byte strings, fine labels joined by "|"
    /{partition}/{user_id}/image_ids            (N,) byte strings

Partitions are ``train``, ``val`` and ``test``.  Label vocabularies: passed in,
or read from ``/metadata/label_mapping`` / ``/metadata/fine_grained_label_mapping``
when present (a JSON object ``{label: index}`` stored as a string dataset or
attribute), else from ``/metadata/label_counter`` /
``/metadata/fine_grained_label_counter`` (the JSON ``{label: count}`` that
FLAIR's ``prepare_dataset.py`` writes; index = sorted order), otherwise the
sorted union of labels found in the file (one scan).

FLAIR's public metadata has no device field; HeteroSwitch-style per-device
evaluation needs an optional ``user -> device`` map (a dict or a JSON file).

Labels are multi-hot (FLAIR is multi-label); use
:func:`heteroswitch.metrics.average_precision` with the multi-hot targets for
FLAIR's macro/micro AP.  Images stay channels-last uint8 as stored;
:meth:`FlairUser.channels_first` gives the ``(N, 3, H, W)`` layout the trainer takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["FlairUser", "FlairReader", "decode_labels"]


def _to_str(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def decode_labels(raw, vocab: dict[str, int]) -> np.ndarray:
    """``|``-joined byte strings -> multi-hot ``(N, len(vocab))`` bool; unknown labels raise ``KeyError``."""
    out = np.zeros((len(raw), len(vocab)), dtype=bool)
    for i, v in enumerate(raw):
        s = _to_str(v)
        for lab in filter(None, s.split("|")):
            try:
                out[i, vocab[lab]] = True
            except KeyError:
                raise KeyError(f"label {lab!r} is not in the label vocabulary ({len(vocab)} labels)") from None
    return out


@dataclass
class FlairUser:
    user_id: str
    partition: str
    images: np.ndarray          # (N, H, W, 3) uint8
    labels: np.ndarray          # (N, L) bool multi-hot, coarse
    fine_labels: np.ndarray | None  # (N, F) bool multi-hot, or None
    image_ids: list[str]
    device: str | None = None

    def channels_first(self) -> np.ndarray:
        return np.ascontiguousarray(self.images.transpose(0, 3, 1, 2))

    def __len__(self) -> int:
        return len(self.image_ids)


class FlairReader:
    """Random access to users of a FLAIR HDF5 file; use as a context manager.

    Each partition's user list is read once (the file is opened read-only) and kept with a
    set of its ids, so :meth:`read_user`'s membership check is O(1) and :meth:`iter_users`
    is linear in the number of users (FLAIR's train partition has 51,414), not quadratic.
    """

    def __init__(self, path: str | Path, label_names: list[str] | None = None,
                 fine_label_names: list[str] | None = None, device_map: dict[str, str] | str | Path | None = None):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"FLAIR HDF5 file not found: {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"{self.path} is not a readable HDF5 file: {e}") from None
        if isinstance(device_map, (str, Path)):
            with open(device_map, encoding="utf-8") as fh:
                device_map = json.load(fh)
        self.device_map: dict[str, str] = dict(device_map or {})
        self._user_index: dict[str, tuple[list[str], frozenset[str]]] = {}  # partition -> (ids in order, id set)
        self.label_vocab = self._vocab(label_names, "label_mapping", "labels", "label_counter")
        self.fine_label_vocab = self._vocab(fine_label_names, "fine_grained_label_mapping", "fine_grained_labels",
                                            "fine_grained_label_counter")

    # -- vocabularies -----------------------------------------------------------------
    def _vocab(self, names, meta_key: str, field: str, counter_key: str) -> dict[str, int]:
        if names is not None:
            return {n: i for i, n in enumerate(names)}
        meta = self._f.get("metadata")
        if meta is not None:
            raw = meta[meta_key][()] if meta_key in meta else meta.attrs.get(meta_key)
            if raw is not None:
                m = json.loads(_to_str(raw))
                return dict(m) if isinstance(m, dict) else {n: i for i, n in enumerate(m)}
            if counter_key in meta:  # what FLAIR's prepare_dataset.py writes: {label: count}; index = sorted order
                return {n: i for i, n in enumerate(sorted(json.loads(_to_str(meta[counter_key][()]))))}
        found: set[str] = set()
        for part in self.partitions():
            for uid in self._f[part]:
                g = self._f[part][uid]
                if field in g:
                    for v in g[field][()]:
                        found.update(filter(None, _to_str(v).split("|")))
        return {n: i for i, n in enumerate(sorted(found))}

    # -- access ---------------------------------------------------------------------
    def partitions(self) -> list[str]:
        return [k for k in self._f.keys() if k != "metadata"]

    def _index(self, partition: str) -> tuple[list[str], frozenset[str]]:
        idx = self._user_index.get(partition)
        if idx is None:
            if partition not in self._f or partition == "metadata":
                raise KeyError(f"partition {partition!r} not in {self.path.name}; partitions: {self.partitions()}")
            ids = list(self._f[partition].keys())
            idx = self._user_index[partition] = (ids, frozenset(ids))
        return idx

    def users(self, partition: str) -> list[str]:
        """The partition's user ids in file order (a fresh list: the caller may change it)."""
        return list(self._index(partition)[0])

    def read_user(self, partition: str, user_id: str) -> FlairUser:
        """One user's photos and labels; the membership check is an O(1) set lookup."""
        if user_id not in self._index(partition)[1]:
            raise KeyError(f"user {user_id!r} not in partition {partition!r}")
        g = self._f[partition][user_id]
        for need in ("images", "labels", "image_ids"):
            if need not in g:
                raise ValueError(f"{partition}/{user_id} lacks the {need!r} dataset (not FLAIR's layout?)")
        images = g["images"][()]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{partition}/{user_id}/images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        n = images.shape[0]
        if n == 0:
            raise ValueError(f"{partition}/{user_id} has no images (empty client)")
        raw_labels = g["labels"][()]
        if len(raw_labels) != n:
            raise ValueError(f"{partition}/{user_id}: {n} images but {len(raw_labels)} label rows")
        fine = decode_labels(g["fine_grained_labels"][()], self.fine_label_vocab) if "fine_grained_labels" in g else None
        return FlairUser(
            user_id=user_id, partition=partition, images=images,
            labels=decode_labels(raw_labels, self.label_vocab), fine_labels=fine,
            image_ids=[_to_str(v) for v in g["image_ids"][()]], device=self.device_map.get(user_id),
        )

    def iter_users(self, partition: str) -> Iterator[FlairUser]:
        """Every user of the partition in file order: O(users) lookups in all (each one O(1))."""
        for uid in self._index(partition)[0]:
            yield self.read_user(partition, uid)

    def users_by_device(self, partition: str) -> dict[str, list[str]]:
        """Group a partition's users by the device map (unmapped users under ``"unknown"``)."""
        out: dict[str, list[str]] = {}
        for uid in self._index(partition)[0]:
            out.setdefault(self.device_map.get(uid, "unknown"), []).append(uid)
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "FlairReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
