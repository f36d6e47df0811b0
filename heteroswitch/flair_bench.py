"""FLAIR end to end: a user's FLAIR HDF5 file as the federated device benchmark's dataset.

``heteroswitch bench --flair FILE`` trains the five methods on FLAIR's users
(multi-label, binary cross-entropy) and reports FLAIR's averaged precision per
device.  FLAIR's public metadata has no device field, so each user needs a
device (the data card, ``datasets/README.md``, describes both ways):

* ``--device-map map.json``: ``{user_id: device}`` supplied by the user; users
  missing from it are left out (their count is logged);
* otherwise :func:`hash_device`: ``sha256(user_id)`` picks a device with the
  probabilities of the device mix -- deterministic, the same on every machine.

With ``render`` (default) every image is re-shot through its user's simulated
phone (:func:`heteroswitch.devices.render`, the sRGB photo taken as the scene),
and the test images are shot through *every* device (paired, as in the
synthetic benchmark), so per-device AP measures device-induced bias.  Without
it the photos stay as they are and each device's test set is its own users'
images.  Users mapped to the unseen device never train.  Images are resized to
``image_size`` (FLAIR stores 256x256).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from . import devices as _devices
from .flair import FlairReader
from .isp import resize, srgb_to_linear
from .scenes import ClientData, FederatedConfig, FederatedDataset

__all__ = ["FlairConfig", "hash_device", "load_flair_dataset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlairConfig:
    path: str
    device_map: str | None = None        # JSON {user_id: device}; None -> hash_device over device_mix
    image_size: int = 64
    max_train_users: int | None = 200    # the first N train users (file order); None = all
    test_images: int = 1000              # test images pooled from the test (else val) partition
    render: bool = True                  # re-shoot every image through its user's simulated phone
    unseen_device: str = "G4"
    profile_set: str = ""
    fine_grained: bool = False           # FLAIR's 1,628 fine labels instead of the 17 coarse ones
    device_mix: dict[str, float] = field(default_factory=lambda: dict(FederatedConfig().device_mix))

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.test_images < 1:
            raise ValueError("image_size must be >= 8 and test_images >= 1")
        if self.max_train_users is not None and self.max_train_users < 1:
            raise ValueError("max_train_users must be >= 1 (or None for all)")


def hash_device(user_id: str, mix: dict[str, float]) -> str:
    """A user's simulated device: ``sha256(user_id)`` as a uniform number in [0, 1), mapped
    through the cumulative device mix (devices in the mix's order; weight 0 never drawn)."""
    names = [d for d, w in mix.items() if w > 0]
    if not names:
        raise ValueError("device mix has no device with weight > 0")
    w = np.array([mix[d] for d in names], dtype=np.float64)
    u = int.from_bytes(hashlib.sha256(user_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return names[min(int(np.searchsorted(np.cumsum(w / w.sum()), u, side="right")), len(names) - 1)]


def _shoot(images_nhwc: np.ndarray, profile, size: int, g: torch.Generator | None, device) -> np.ndarray:
    """uint8 NHWC photos -> uint8 NCHW at ``size``: resized, and through ``profile`` when given."""
    x = torch.as_tensor(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)), device=device).float() / 255.0
    if profile is None:
        out = resize(x, size)
    else:  # the photo is the scene: back to linear light at 2x the output size, then the phone's pipeline
        out = _devices.render(srgb_to_linear(resize(x, 2 * size).clamp(0, 1)), profile, size, g)
    return (out.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def load_flair_dataset(cfg: FlairConfig, seed: int = 0, device="cpu") -> FederatedDataset:
    """Read the FLAIR file into a :class:`~heteroswitch.scenes.FederatedDataset` with multi-hot labels."""
    mapping = None
    if cfg.device_map:
        with open(cfg.device_map, encoding="utf-8") as f:
            mapping = json.load(f)
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"{cfg.device_map}: a device map must be a JSON object {{user_id: device name}}")
    pdir = _devices.profiles_dir() / cfg.profile_set if cfg.profile_set else _devices.profiles_dir()
    known = _devices.list_devices(pdir)
    names = [d for d in _devices.DEVICE_NAMES if d in known] if cfg.render else None
    with FlairReader(cfg.path, device_map=mapping) as r:
        parts = r.partitions()
        if "train" not in parts:
            raise ValueError(f"{cfg.path}: no 'train' partition (partitions: {parts}); not FLAIR's layout?")
        test_part = "test" if "test" in parts else ("val" if "val" in parts else None)
        if test_part is None:
            raise ValueError(f"{cfg.path}: needs a 'test' or 'val' partition to evaluate on (partitions: {parts})")
        dev_of = (lambda u: mapping.get(u)) if mapping is not None else (lambda u: hash_device(u, cfg.device_mix))
        if cfg.render:
            used = set(mapping.values()) if mapping is not None else {d for d, w in cfg.device_mix.items() if w > 0}
            missing = sorted((used | {cfg.unseen_device}) - set(known))
            if missing:
                raise KeyError(f"no device profile for {missing}; known devices in {pdir}: {', '.join(known)}")
        profiles = {d: _devices.load_profile(d, pdir) for d in known} if cfg.render else {}
        g = torch.Generator(device="cpu").manual_seed(seed)
        label = (lambda u: u.fine_labels) if cfg.fine_grained else (lambda u: u.labels)
        clients, skipped = [], 0
        for uid in r.users("train"):
            if cfg.max_train_users is not None and len(clients) >= cfg.max_train_users:
                break
            d = dev_of(uid)
            if d is None or d == cfg.unseen_device:
                skipped += d is None
                continue
            u = r.read_user("train", uid)
            imgs = _shoot(u.images, profiles.get(d) if cfg.render else None, cfg.image_size, g, device)
            clients.append(ClientData(uid, d, imgs, label(u).astype(np.uint8)))
        if skipped:
            log.warning("%d train users are not in the device map and were left out", skipped)
        if not clients:
            raise ValueError(f"{cfg.path}: no train user left to train (device map covers none, or all are unseen)")
        pool, pool_y, pool_dev = [], [], []
        for uid in r.users(test_part):
            if sum(len(x) for x in pool) >= cfg.test_images:
                break
            u = r.read_user(test_part, uid)
            pool.append(u.images)
            pool_y.append(label(u).astype(np.uint8))
            pool_dev += [dev_of(uid)] * len(u)
        x, y = np.concatenate(pool)[:cfg.test_images], np.concatenate(pool_y)[:cfg.test_images]
        pool_dev = np.array(pool_dev[:cfg.test_images], dtype=object)
        test = {}
        if cfg.render:  # paired: the same photos through every phone
            for i, d in enumerate(names):
                gd = torch.Generator(device="cpu").manual_seed(seed + 2_000_003 + i)
                test[d] = (_shoot(x, profiles[d], cfg.image_size, gd, device), y)
        else:
            for d in sorted({d for d in pool_dev if d is not None}):
                m = pool_dev == d
                test[d] = (_shoot(x[m], None, cfg.image_size, None, device), y[m])
        if cfg.unseen_device not in test:
            raise ValueError(f"unseen device {cfg.unseen_device!r} has no test images (devices: {sorted(test)})")
        vocab = r.fine_label_vocab if cfg.fine_grained else r.label_vocab
    return FederatedDataset(clients, test, cfg.unseen_device, num_classes=len(vocab))
