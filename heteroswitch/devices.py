"""Simulated phone camera pipelines (sensor + ISP) loaded from JSON profiles.

HeteroSwitch's device set is nine phones: GalaxyS22, GalaxyS9, GalaxyS6,
VELVET, G7, G4, Pixel5, Pixel2, Nexus5X (3 vendors x 3 generations).  Their
images cannot be downloaded here, so each phone is simulated by a profile in
``datasets/devices/<Name>.json``.  Every number in those profiles is a
documented *assumption* (see ``datasets/README.md``): vendor "looks" (warm and
saturated vs. neutral vs. flat and cool) and generation (noise, resolution,
colour cross-talk, JPEG quality) are encoded as sensor and ISP parameters.

Rendering (:func:`render`): linear scene radiance -> sensor spectral mixing and
exposure -> resolution (resample) -> Bayer mosaic -> shot + read noise ->
bilinear demosaic -> white balance (ideal gains x the vendor's AWB bias) ->
colour correction (inverse sensor mix x saturation "look") -> sRGB encoding
with an extra power-law gamma -> tone curve -> sharpening (unsharp mask) ->
JPEG-like quantisation -> resize to the output size.

Profile sets: ``datasets/devices/*.json`` is benchmark revision 2;
``datasets/devices/tradeoff/*.json`` is the trade-off benchmark (each vendor a
different *kind* of bias), chosen by ``FederatedConfig.profile_set``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import isp

__all__ = [
    "DEVICE_NAMES",
    "SensorParams",
    "ISPParams",
    "DeviceProfile",
    "profiles_dir",
    "list_devices",
    "load_profile",
    "load_profiles",
    "render",
]

#: The paper's nine phones, in vendor-major, newest-first order.
DEVICE_NAMES: tuple[str, ...] = (
    "GalaxyS22", "GalaxyS9", "GalaxyS6",
    "VELVET", "G7", "G4",
    "Pixel5", "Pixel2", "Nexus5X",
)

_ENV = "HETEROSWITCH_DEVICES_DIR"


@dataclass(frozen=True)
class SensorParams:
    """Sensor model. ``spectral_matrix`` maps scene linear RGB to camera RGB
    (rows: camera R, G, B); off-diagonal terms are colour cross-talk."""

    spectral_matrix: tuple[tuple[float, float, float], ...]
    cfa: str = "RGGB"
    exposure: float = 1.0
    resolution_scale: float = 1.0
    shot_noise: float = 0.0
    read_noise: float = 0.0


@dataclass(frozen=True)
class ISPParams:
    """ISP model. ``awb_bias`` multiplies the ideal white-balance gains (the
    vendor's colour "look" / AWB error); ``saturation`` scales chroma in the
    CCM; ``gamma`` is an extra power law on top of sRGB (1 = plain sRGB);
    ``tone`` the S-curve strength; ``sharpen`` the unsharp-mask amount (0 =
    none; applied after the tone curve, before JPEG); ``jpeg_quality`` None disables JPEG;
    ``ccm_accuracy`` in [0, 1] is how much of the sensor's true cross-talk the
    CCM was calibrated to undo (cheaper phones: less)."""

    awb_bias: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0
    gamma: float = 1.0
    tone: float = 0.0
    sharpen: float = 0.0
    jpeg_quality: int | None = None
    ccm_accuracy: float = 1.0


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    vendor: str
    tier: str
    year: int
    sensor: SensorParams
    isp: ISPParams
    notes: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceProfile":
        try:
            s = dict(d["sensor"])
            s["spectral_matrix"] = tuple(tuple(float(v) for v in row) for row in s["spectral_matrix"])
            i = dict(d["isp"])
            if "awb_bias" in i:
                i["awb_bias"] = tuple(float(v) for v in i["awb_bias"])
            prof = cls(
                name=d["name"], vendor=d["vendor"], tier=d["tier"], year=int(d["year"]),
                sensor=SensorParams(**s), isp=ISPParams(**i), notes=d.get("notes", ""),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed device profile {d.get('name', '?')!r}: {e}") from e
        m = prof.sensor.spectral_matrix
        if len(m) != 3 or any(len(r) != 3 for r in m):
            raise ValueError(f"device {prof.name}: spectral_matrix must be 3x3")
        return prof

    def to_dict(self) -> dict:
        return asdict(self)


def profiles_dir() -> Path:
    """Where device profiles live: ``$HETEROSWITCH_DEVICES_DIR`` or the repo's
    ``datasets/devices`` (a data folder beside the package, not a package)."""
    env = os.environ.get(_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "datasets" / "devices"


def list_devices(directory: str | Path | None = None) -> list[str]:
    d = Path(directory) if directory else profiles_dir()
    return sorted(p.stem for p in d.glob("*.json"))


def load_profile(name: str, directory: str | Path | None = None) -> DeviceProfile:
    """Load one device profile by name; ``KeyError`` names the known devices."""
    d = Path(directory) if directory else profiles_dir()
    path = d / f"{name}.json"
    if not path.is_file():
        known = list_devices(d)
        raise KeyError(
            f"unknown device profile {name!r}; known devices in {d}: {', '.join(known) or '(none found)'}"
            + ("" if known else f" (set ${_ENV} to the folder holding the *.json profiles)")
        )
    with open(path, encoding="utf-8") as f:
        return DeviceProfile.from_dict(json.load(f))


def load_profiles(names=None, directory: str | Path | None = None) -> dict[str, DeviceProfile]:
    names = DEVICE_NAMES if names is None else tuple(names)
    return {n: load_profile(n, directory) for n in names}


def _saturation_matrix(s: float, dtype, device) -> torch.Tensor:
    """CCM that scales chroma by ``s`` around Rec.709 luminance."""
    lum = torch.tensor([0.2126, 0.7152, 0.0722], dtype=dtype, device=device)
    gray = lum.expand(3, 3)
    return (1.0 - s) * gray + s * torch.eye(3, dtype=dtype, device=device)


def render(
    scene_linear: torch.Tensor,
    profile: DeviceProfile,
    out_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Render linear scene radiance ``(N, 3, H, W)`` in [0, 1] through ``profile``.

    Returns display-referred float images ``(N, 3, out_size, out_size)`` in
    [0, 1].  Deterministic for a given generator state (noise is the only
    randomness).
    """
    isp.check_images(scene_linear, name="scene_linear")
    s, p = profile.sensor, profile.isp
    dt, dev = scene_linear.dtype, scene_linear.device
    m = torch.tensor(s.spectral_matrix, dtype=dt, device=dev)
    cam = isp.apply_ccm(scene_linear, m) * s.exposure
    h = scene_linear.shape[2]
    native = max(8, int(round(h * s.resolution_scale / 2)) * 2)  # even, for the Bayer grid
    cam = isp.resize(cam.clamp(0.0, 1.0), native)
    raw = isp.mosaic(cam, s.cfa)
    if s.shot_noise > 0 or s.read_noise > 0:
        raw = isp.add_sensor_noise(raw, s.shot_noise, s.read_noise, generator).clamp(0.0, 1.0)
    rgb = isp.demosaic_bilinear(raw, s.cfa)
    # ideal white balance makes a white scene patch neutral: gains = 1 / (M @ 1)
    ideal = 1.0 / (m.sum(dim=1) * s.exposure)
    gains = ideal * torch.tensor(p.awb_bias, dtype=dt, device=dev)
    eye = torch.eye(3, dtype=dt, device=dev)
    m_est = eye + p.ccm_accuracy * (m / m.sum(dim=1, keepdim=True) - eye)
    ccm = _saturation_matrix(p.saturation, dt, dev) @ torch.linalg.inv(m_est)
    out = isp.process(rgb, wb_gains=gains, ccm=ccm, gamma=None, tone=p.tone)
    if p.gamma != 1.0:
        out = isp.apply_gamma(out, p.gamma)
    if p.sharpen:
        out = isp.unsharp_mask(out, p.sharpen).clamp(0.0, 1.0)
    if p.jpeg_quality is not None:
        out = isp.jpeg_quantize(out, p.jpeg_quality)
    return isp.resize(out, out_size).clamp(0.0, 1.0)
