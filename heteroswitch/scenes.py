"""Synthetic class-conditional scenes rendered through simulated phones, and
their partition into federated clients.

Why synthetic: HeteroSwitch's own data (12 ImageNet classes shot off a monitor
by nine phones) is not downloadable here.  We keep its structure: the *same*
test scenes are "shot" by every device (paired, like shooting one monitor), and
each training client is one user of one device.

Scenes: 12 classes that differ by **shape/texture** (disk, square, triangle,
ring, plus, stripes x3 orientations, checkerboard, dot grid, diamond, X), which
is the causal cue.  The foreground colour is **class-correlated**: with
probability ``colour_correlation`` its hue is the class's hue (12 hues, 30
degrees apart) plus jitter, otherwise uniform.  A naive model can over-fit to
colour, and colour is exactly what device pipelines distort (white balance,
saturation, gamma), which is the device-induced bias this benchmark probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import devices as _devices
from .isp import srgb_to_linear

__all__ = [
    "NUM_CLASSES",
    "CLASS_NAMES",
    "SceneConfig",
    "render_scenes",
    "FederatedConfig",
    "ClientData",
    "FederatedDataset",
    "make_federated_dataset",
    "save_dataset",
    "load_dataset",
]

CLASS_NAMES: tuple[str, ...] = (
    "disk", "square", "triangle", "ring", "plus", "hstripes",
    "vstripes", "dstripes", "checker", "dots", "diamond", "xcross",
)
NUM_CLASSES = len(CLASS_NAMES)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes look.  ``base_size`` is the scene resolution before a device
    resamples it (>= output size so that resolution differences show).

    Defaults are benchmark revision 2 (our assumption): colour is a strong
    shortcut (class hue with probability 0.9) and the shape cue is harder than
    in revision 1 (fg/bg brightness ranges overlap, coloured backgrounds, 10 %
    texture noise), so that a naive model leans on colour -- which the device
    pipelines distort -- and FedAvg carries real device-induced bias.
    ``colour_pairs > 0`` (the trade-off benchmark): the first and the last
    ``colour_pairs`` classes form pairs of one shape whose identity lies in true
    colour (hues ``pair_hue_delta`` apart, always that hue, saturated), so a
    device's colour cast -- and random white balance and gamma -- can destroy
    class signal.
    Revision 1 was ``SceneConfig(colour_correlation=0.8, hue_jitter=0.03,
    texture_noise=0.04, fg_value=(0.55, 0.95), bg_value=(0.15, 0.5),
    bg_saturation=0.15)`` (it saturated at ~98 % AP at 64x64)."""

    base_size: int = 64
    colour_correlation: float = 0.9
    hue_jitter: float = 0.02
    texture_noise: float = 0.1
    fg_value: tuple[float, float] = (0.4, 0.9)        # foreground brightness range (HSV value)
    bg_value: tuple[float, float] = (0.2, 0.7)        # background brightness range (overlaps the foreground's)
    bg_saturation: float = 0.3                        # background saturation upper bound (hue random)
    colour_pairs: int = 0           # trade-off benchmark: classes told apart by true colour alone
    pair_hue_delta: float = 0.08    # hue difference between the two classes of a pair
    pair_saturation: tuple[float, float] = (0.75, 0.95)

    def __post_init__(self) -> None:
        if not 0 <= self.colour_pairs <= NUM_CLASSES // 2:
            raise ValueError(f"colour_pairs must be in [0, {NUM_CLASSES // 2}], got {self.colour_pairs}")

    def shape_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Shape index per label: the last ``colour_pairs`` classes reuse the shapes of
        the first ``colour_pairs`` (same shape, different true colour)."""
        k = self.colour_pairs
        return torch.where(labels >= NUM_CLASSES - k, labels - (NUM_CLASSES - k), labels)

    def identity_hue(self, labels: torch.Tensor) -> torch.Tensor:
        """Identity hue of a colour-pair class (undefined for other classes): pair ``j``
        has hue ``(j + 0.5) / colour_pairs`` for the first class and ``+ pair_hue_delta``
        for its twin."""
        k = max(1, self.colour_pairs)
        j = self.shape_of(labels).float()
        twin = (labels >= NUM_CLASSES - self.colour_pairs).float()
        return ((j + 0.5) / k + twin * self.pair_hue_delta) % 1.0


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB, all inputs ``(N,)`` in [0, 1]; returns ``(N, 3)``."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    f = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] * (1 - s[:, None] * f)


def _shape_masks(labels: torch.Tensor, size: int, g: torch.Generator, device) -> torch.Tensor:
    """Soft foreground masks ``(N, H, W)`` for each image's class."""
    n = labels.shape[0]
    r = lambda *s: torch.rand(*s, generator=g, device=g.device).to(device)  # noqa: E731
    lin = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy = (r(n) - 0.5) * 0.4, (r(n) - 0.5) * 0.4
    scale = 0.45 + 0.25 * r(n)
    theta = (r(n) - 0.5) * 0.6
    freq = 3.0 + 2.0 * r(n)
    phase = r(n) * 2 * math.pi
    x = xx[None] - cx[:, None, None]
    y = yy[None] - cy[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    xr, yr = c * x + s * y, -s * x + c * y
    sc = scale[:, None, None]
    sharp = size / 4.0  # edge softness ~ 1 pixel

    def soft(d):  # d < 0 inside
        return torch.sigmoid(-d * sharp)

    rad = torch.sqrt(xr * xr + yr * yr)
    f = freq[:, None, None] * math.pi
    ph = phase[:, None, None]
    box = torch.maximum(xr.abs(), yr.abs())
    m = torch.zeros(n, size, size, device=device)
    shapes = [
        lambda: soft(rad - sc),                                                     # disk
        lambda: soft(box - sc * 0.85),                                              # square
        lambda: soft(torch.maximum(yr - sc * 0.6, (-yr * 0.5 + xr.abs() * 0.87) - sc * 0.35)),  # triangle
        lambda: soft((rad - sc * 0.75).abs() - sc * 0.18),                          # ring
        lambda: soft(torch.minimum(torch.maximum(xr.abs() - sc * 0.22, yr.abs() - sc),
                                   torch.maximum(yr.abs() - sc * 0.22, xr.abs() - sc))),  # plus
        lambda: torch.sigmoid(torch.sin(yr * f + ph) * 4) * soft(box - sc * 1.3),   # hstripes
        lambda: torch.sigmoid(torch.sin(xr * f + ph) * 4) * soft(box - sc * 1.3),   # vstripes
        lambda: torch.sigmoid(torch.sin((xr + yr) * f * 0.7 + ph) * 4) * soft(box - sc * 1.3),  # dstripes
        lambda: torch.sigmoid(torch.sin(xr * f) * torch.sin(yr * f) * 6) * soft(box - sc * 1.3),  # checker
        lambda: soft(torch.sqrt(torch.sin(xr * f * 0.8) ** 2 + torch.sin(yr * f * 0.8) ** 2) - 0.6)
        * soft(box - sc * 1.3),                                                     # dots
        lambda: soft(xr.abs() + yr.abs() - sc * 1.1),                               # diamond
        lambda: soft(torch.minimum((xr - yr).abs(), (xr + yr).abs()) * 0.707 - sc * 0.16) * soft(rad - sc * 1.2),  # X
    ]
    for k, fn in enumerate(shapes):
        idx = (labels == k).nonzero().flatten()
        if idx.numel():
            m[idx] = fn()[idx]
    return m


def render_scenes(
    labels: torch.Tensor, config: SceneConfig, generator: torch.Generator, device="cpu"
) -> torch.Tensor:
    """Scene radiance ``(N, 3, S, S)`` in linear light for the given labels."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    n, size = labels.shape[0], config.base_size
    r = lambda *s: torch.rand(*s, generator=generator, device=generator.device).to(device)  # noqa: E731
    mask = _shape_masks(config.shape_of(labels), size, generator, device)
    corr = r(n) < config.colour_correlation
    jitter = (r(n) - 0.5) * 2 * config.hue_jitter
    class_hue = labels.float() / NUM_CLASSES + jitter
    hue = torch.where(corr, class_hue, r(n)) % 1.0
    sat = 0.55 + 0.4 * r(n)
    if config.colour_pairs:
        k = config.colour_pairs
        pair = (labels < k) | (labels >= NUM_CLASSES - k)
        hue = torch.where(pair, (config.identity_hue(labels) + jitter) % 1.0, hue)
        ps = config.pair_saturation
        sat = torch.where(pair, ps[0] + (ps[1] - ps[0]) * r(n), sat)
    fv, bv = config.fg_value, config.bg_value
    fg = _hsv_to_rgb(hue, sat, fv[0] + (fv[1] - fv[0]) * r(n))
    bg = _hsv_to_rgb(r(n), config.bg_saturation * r(n), bv[0] + (bv[1] - bv[0]) * r(n))
    img = mask[:, None] * fg[:, :, None, None] + (1 - mask[:, None]) * bg[:, :, None, None]
    noise = torch.randn(n, 1, size, size, generator=generator, device=generator.device).to(device)
    img = (img * (1 + config.texture_noise * noise)).clamp(0, 1)
    return srgb_to_linear(img)  # generated colours are sRGB-like; the scene is linear radiance


# --------------------------------------------------------------------------- federated
@dataclass(frozen=True)
class FederatedConfig:
    """Client partition.  ``device_mix`` gives the share of training clients per
    device (normalised; devices with weight 0 get none); ``unseen_device`` is
    rendered only for testing.  ``alpha`` is the Dirichlet concentration of each
    client's label distribution (small = skewed).  Defaults are our assumption
    of a market-skewed population (revision 2): 60 % Samsung clients (warm
    look), 28 % Google, 12 % LG; the unseen device G4 is a low-tier LG, whose
    cool cast is the opposite of the majority's look."""

    num_clients: int = 90
    samples_per_client: int = 48
    alpha: float = 0.5
    device_mix: dict[str, float] = field(default_factory=lambda: {
        "GalaxyS22": 0.30, "GalaxyS9": 0.20, "GalaxyS6": 0.10,
        "VELVET": 0.08, "G7": 0.04, "G4": 0.0,
        "Pixel5": 0.15, "Pixel2": 0.08, "Nexus5X": 0.05,
    })
    unseen_device: str = "G4"
    test_per_class: int = 20
    image_size: int = 32
    scene: SceneConfig = SceneConfig()
    profile_set: str = ""   # sub-folder of the profiles folder ("" = revision 2; "tradeoff")

    def profiles_directory(self) -> Path:
        return _devices.profiles_dir() / self.profile_set if self.profile_set else _devices.profiles_dir()

    def validate(self, known: list[str]) -> None:
        for d in list(self.device_mix) + [self.unseen_device]:
            if d not in known:
                raise KeyError(f"unknown device profile {d!r}; known devices: {', '.join(known)}")
        if self.samples_per_client <= 0:
            raise ValueError(f"samples_per_client must be > 0 (an empty client cannot train), got {self.samples_per_client}")
        if self.num_clients <= 0:
            raise ValueError(f"num_clients must be > 0, got {self.num_clients}")
        if self.device_mix.get(self.unseen_device, 0) > 0:
            raise ValueError(f"unseen device {self.unseen_device!r} must have device_mix weight 0")
        if sum(self.device_mix.values()) <= 0:
            raise ValueError("device_mix weights must sum to > 0")


@dataclass
class ClientData:
    client_id: str
    device: str
    images: np.ndarray  # (n, 3, H, W) uint8
    labels: np.ndarray  # (n,) int64


@dataclass
class FederatedDataset:
    clients: list[ClientData]
    test: dict[str, tuple[np.ndarray, np.ndarray]]  # device -> (images uint8, labels)
    unseen_device: str
    num_classes: int = NUM_CLASSES

    @property
    def devices(self) -> list[str]:
        return list(self.test)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def _allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of ``n`` clients to devices by weight."""
    tot = sum(weights.values())
    raw = {d: n * w / tot for d, w in weights.items() if w > 0}
    out = {d: int(math.floor(v)) for d, v in raw.items()}
    for d in sorted(raw, key=lambda d: raw[d] - out[d], reverse=True)[: n - sum(out.values())]:
        out[d] += 1
    return out


def _render_through(labels: torch.Tensor, profile, cfg: FederatedConfig, g: torch.Generator, device, chunk=512):
    outs = []
    for i in range(0, labels.shape[0], chunk):
        scene = render_scenes(labels[i:i + chunk], cfg.scene, g, device)
        outs.append(_devices.render(scene, profile, cfg.image_size, g))
    return torch.cat(outs)


def make_federated_dataset(cfg: FederatedConfig, seed: int = 0, device="cpu",
                           profiles_directory: str | Path | None = None) -> FederatedDataset:
    """Render the federated device benchmark deterministically from ``seed``.

    Training clients: one (device, user) each; labels ~ Dirichlet(alpha) per
    client; scenes drawn fresh per client.  Test: ``test_per_class`` scenes per
    class, the *same* scenes rendered through every device (unseen included).
    """
    profiles_directory = profiles_directory or cfg.profiles_directory()
    known = _devices.list_devices(profiles_directory)
    cfg.validate(known)
    names = [d for d in _devices.DEVICE_NAMES if d in known] + [d for d in known if d not in _devices.DEVICE_NAMES]
    profiles = {d: _devices.load_profile(d, profiles_directory) for d in names}
    rng = np.random.default_rng(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    alloc = _allocate(cfg.num_clients, cfg.device_mix)
    clients: list[ClientData] = []
    for d in names:
        for u in range(alloc.get(d, 0)):
            p = rng.dirichlet(np.full(NUM_CLASSES, cfg.alpha))
            lab = rng.choice(NUM_CLASSES, size=cfg.samples_per_client, p=p)
            imgs = _render_through(torch.as_tensor(lab), profiles[d], cfg, g, device)
            clients.append(ClientData(f"{d}/u{u:03d}", d, _to_uint8(imgs), lab.astype(np.int64)))
    test_labels = torch.arange(NUM_CLASSES).repeat_interleave(cfg.test_per_class)
    test = {}
    for d in names:
        # same scenes for every device: reseed the scene generator identically
        gd = torch.Generator(device="cpu").manual_seed(seed + 1_000_003)
        scenes = [render_scenes(test_labels[i:i + 512], cfg.scene, gd, device) for i in range(0, len(test_labels), 512)]
        gn = torch.Generator(device="cpu").manual_seed(seed + 2_000_003 + names.index(d))
        imgs = torch.cat([_devices.render(s, profiles[d], cfg.image_size, gn) for s in scenes])
        test[d] = (_to_uint8(imgs), test_labels.numpy().astype(np.int64))
    return FederatedDataset(clients, test, cfg.unseen_device)


def save_dataset(ds: FederatedDataset, path: str | Path) -> None:
    """Store as a plain ``.npz`` (no pickle): concatenated arrays + offsets."""
    arrays = {
        "train_images": np.concatenate([c.images for c in ds.clients]),
        "train_labels": np.concatenate([c.labels for c in ds.clients]),
        "train_offsets": np.cumsum([0] + [len(c.labels) for c in ds.clients]).astype(np.int64),
        "client_ids": np.array([c.client_id for c in ds.clients]),
        "client_devices": np.array([c.device for c in ds.clients]),
        "test_devices": np.array(list(ds.test)),
        "unseen_device": np.array(ds.unseen_device),
        "num_classes": np.array(ds.num_classes),
    }
    for i, (d, (x, y)) in enumerate(ds.test.items()):
        arrays[f"test_images_{i}"], arrays[f"test_labels_{i}"] = x, y
    np.savez(path, **arrays)


def load_dataset(path: str | Path) -> FederatedDataset:
    with np.load(path, allow_pickle=False) as z:
        off = z["train_offsets"]
        clients = [
            ClientData(str(cid), str(dev), z["train_images"][off[i]:off[i + 1]], z["train_labels"][off[i]:off[i + 1]])
            for i, (cid, dev) in enumerate(zip(z["client_ids"], z["client_devices"]))
        ]
        test = {str(d): (z[f"test_images_{i}"], z[f"test_labels_{i}"]) for i, d in enumerate(z["test_devices"])}
        return FederatedDataset(clients, test, str(z["unseen_device"]), int(z["num_classes"]))
