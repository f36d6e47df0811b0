"""Image-signal-processor (ISP) operations on batched float images.

All public functions take ``torch.Tensor`` images laid out ``(N, C, H, W)``
(``C == 3`` for RGB, ``C == 1`` for a Bayer mosaic) in a floating dtype, values
nominally in ``[0, 1]``, and return a tensor of the same dtype and device.
Operations are written with differentiable torch primitives wherever the
underlying maths is differentiable (white balance, CCM, gamma, tone curve,
sRGB curve, demosaic, binning); the JPEG-like quantiser rounds and is therefore
not differentiable.

Why this module exists: HeteroSwitch (Kim et al., MLSys 2024) attributes
device-induced data heterogeneity to each phone's sensor + ISP pipeline, and
answers it with a *random ISP transformation* (random white balance and gamma)
used as data diversification.  The same primitives render our simulated phones
(:mod:`heteroswitch.devices`) and perform the diversification
(:class:`RandomISP`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "check_images",
    "srgb_to_linear",
    "linear_to_srgb",
    "apply_white_balance",
    "apply_ccm",
    "apply_gamma",
    "apply_tone_curve",
    "unsharp_mask",
    "mosaic",
    "demosaic_bilinear",
    "add_sensor_noise",
    "bin_downscale",
    "resize",
    "jpeg_quantize",
    "unprocess",
    "process",
    "RandomISPConfig",
    "RandomISP",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


def check_images(x: torch.Tensor, channels: int | None = 3, name: str = "images") -> torch.Tensor:
    """Validate a batch of images and return it unchanged.

    Raises ``ValueError`` with a message that says what was expected, because a
    silent broadcast of a ``(H, W, 3)`` uint8 array through these ops would
    produce garbage rather than an error.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a floating dtype (float16/bfloat16/float32/float64) with values in [0, 1], "
            f"got {x.dtype}; convert uint8 images with x.float() / 255"
        )
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name}: expected {channels} channel(s) in dim 1 (layout N, C, H, W), got shape {tuple(x.shape)}"
        )
    return x


def _per_image(v: torch.Tensor | float | tuple | list, x: torch.Tensor, tail: tuple[int, ...], name: str) -> torch.Tensor:
    """Broadcast a parameter that is global (``tail`` shape) or per image (``(N, *tail)``)."""
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if t.shape == tail:
        return t.unsqueeze(0)
    if t.shape == (x.shape[0], *tail):
        return t
    raise ValueError(f"{name}: expected shape {tail} or {(x.shape[0], *tail)}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------- sRGB curve
def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """Exact IEC 61966-2-1 sRGB decoding (piecewise: linear toe, 2.4 power)."""
    check_images(x, channels=None)
    lo = x / 12.92
    hi = ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(x <= 0.04045, lo, hi)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Exact IEC 61966-2-1 sRGB encoding, the inverse of :func:`srgb_to_linear`."""
    check_images(x, channels=None)
    lo = x * 12.92
    hi = 1.055 * x.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055
    return torch.where(x <= 0.0031308, lo, hi)


# --------------------------------------------------------------------------- colour
def apply_white_balance(x: torch.Tensor, gains) -> torch.Tensor:
    """Multiply each channel by its gain; ``gains`` is ``(3,)`` or ``(N, 3)``.

    Values are not clipped: a gain > 1 can push highlights above 1, which is
    what a real ISP does before its tone/clip stage.  Call ``.clamp(0, 1)``
    where a display-referred image is needed.
    """
    check_images(x)
    g = _per_image(gains, x, (3,), "gains")
    return x * g[:, :, None, None]


def apply_ccm(x: torch.Tensor, ccm) -> torch.Tensor:
    """Apply a 3x3 colour-correction matrix per pixel: ``out_c = sum_k ccm[c, k] * x_k``.

    ``ccm`` is ``(3, 3)`` or ``(N, 3, 3)``.
    """
    check_images(x)
    m = _per_image(ccm, x, (3, 3), "ccm")
    return torch.einsum("nck,nkhw->nchw", m, x)


def apply_gamma(x: torch.Tensor, gamma) -> torch.Tensor:
    """Encode with a power-law gamma: ``out = x ** (1 / gamma)``; ``gamma`` scalar or ``(N,)``.

    ``gamma == 1`` is the identity; ``gamma > 1`` brightens mid-tones (like a
    display encoding).  Negative inputs are clamped to 0 first (no real power).
    """
    check_images(x, channels=None)
    g = _per_image(gamma, x, (), "gamma")
    return x.clamp_min(0.0) ** (1.0 / g)[:, None, None, None]


def apply_tone_curve(x: torch.Tensor, strength) -> torch.Tensor:
    """Global S-shaped tone curve: blend of identity and smoothstep ``3x^2 - 2x^3``.

    ``strength`` in ``[0, 1]`` (scalar or ``(N,)``); 0 is the identity.  Vendors
    differ mostly in how much contrast they add, which this models.
    """
    check_images(x, channels=None)
    s = _per_image(strength, x, (), "strength")[:, None, None, None]
    xc = x.clamp(0.0, 1.0)
    return (1.0 - s) * x + s * (xc * xc * (3.0 - 2.0 * xc))


def unsharp_mask(x: torch.Tensor, amount: float) -> torch.Tensor:
    """Sharpening as phone ISPs do it: ``x + amount * (x - blur(x))`` with a 3x3
    binomial blur (replicate borders); not clipped.  ``amount == 0`` is the identity;
    a constant image is unchanged for any amount."""
    check_images(x, channels=None)
    if amount == 0:
        return x
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    k = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 3, 3)
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k,
                                      groups=x.shape[1])
    return x + amount * (x - blur)


# --------------------------------------------------------------------------- Bayer
def _cfa_masks(pattern: str, h: int, w: int, dtype, device) -> torch.Tensor:
    """(3, H, W) 0/1 masks saying which colour each photosite records."""
    if pattern not in _CFA_PATTERNS:
        raise ValueError(f"unknown CFA pattern {pattern!r}; expected one of {_CFA_PATTERNS}")
    idx = {"R": 0, "G": 1, "B": 2}
    masks = torch.zeros(3, h, w, dtype=dtype, device=device)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        masks[idx[pattern[k]], dy::2, dx::2] = 1.0
    return masks


def mosaic(x: torch.Tensor, pattern: str = "RGGB") -> torch.Tensor:
    """Sample an RGB image through a Bayer colour-filter array -> ``(N, 1, H, W)``."""
    check_images(x)
    m = _cfa_masks(pattern, x.shape[2], x.shape[3], x.dtype, x.device)
    return (x * m).sum(dim=1, keepdim=True)


_K_RB = [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
_K_G = [[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]]


def demosaic_bilinear(raw: torch.Tensor, pattern: str = "RGGB") -> torch.Tensor:
    """Bilinear demosaic by *normalised* convolution, written around a local reference.

    For each channel ``c`` and pixel ``p`` with 3x3 neighbourhood samples
    ``v_i`` of that colour (kernel weights ``w_i``: the textbook bilinear
    kernels), ``out = ref + sum w_i (v_i - ref) / sum w_i`` with ``ref`` one of
    the ``v_i``.  Mathematically this is plain bilinear interpolation (and at
    sampled pixels it returns the sample); the normalisation makes borders
    correct, and differencing against ``ref`` before summing makes a constant
    image come back *bit-exactly* (every difference is exactly 0).
    """
    check_images(raw, channels=1, name="raw")
    n, _, h, w = raw.shape
    m = _cfa_masks(pattern, h, w, raw.dtype, raw.device)  # (3, H, W)
    k = torch.tensor([_K_RB, _K_G, _K_RB], dtype=raw.dtype, device=raw.device).reshape(3, 9, 1)
    pv = F.unfold(raw, 3, padding=1)  # (N, 9, H*W) neighbourhood samples
    pm = F.unfold(m[:, None], 3, padding=1)  # (3, 9, H*W) which neighbours are of colour c
    wgt = pm * k  # (3, 9, H*W)
    has = wgt > 0
    # reference: the first neighbour (in raster order) that carries the colour
    first = torch.argmax(has.to(torch.uint8), dim=1, keepdim=True)  # (3, 1, H*W)
    ref = torch.gather(pv[:, None].expand(n, 3, 9, h * w), 2, first[None].expand(n, 3, 1, h * w))  # (N,3,1,HW)
    diff = torch.where(has[None], pv[:, None] - ref, torch.zeros((), dtype=raw.dtype, device=raw.device))
    out = ref[:, :, 0] + (wgt[None] * diff).sum(dim=2) / wgt.sum(dim=1)[None]
    return out.reshape(n, 3, h, w)


def add_sensor_noise(
    x: torch.Tensor, shot: float, read: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Heteroscedastic sensor noise: variance ``shot * x + read**2`` (Poisson-Gaussian approx.).

    ``generator`` must live on ``x.device``; with the same generator state the
    output is bit-identical.
    """
    check_images(x, channels=None)
    if shot < 0 or read < 0:
        raise ValueError(f"noise levels must be >= 0, got shot={shot}, read={read}")
    if shot == 0 and read == 0:
        return x.clone()
    var = shot * x.clamp_min(0.0) + read * read
    gdev = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=gdev).to(x.device)
    return x + var.sqrt() * eps


def bin_downscale(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor x factor`` pixel bins (sensor binning / downscale)."""
    check_images(x, channels=None)
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"bin factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    return F.avg_pool2d(x, int(factor))


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) to ``size``."""
    check_images(x, channels=None)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[2:]) == size:
        return x
    shrink = size[0] < x.shape[2] or size[1] < x.shape[3]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


# --------------------------------------------------------------------------- JPEG-like
_JPEG_LUMA = [
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
]
_JPEG_CHROMA = [[17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
                [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99]] + [[99] * 8] * 4


@lru_cache(maxsize=None)
def _dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix (float64, CPU; cast at use)."""
    d = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        a = math.sqrt((1 if k == 0 else 2) / n)
        for i in range(n):
            d[k, i] = a * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return d


def _quality_scale(quality: int) -> float:
    """libjpeg's quality -> table scale factor."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    return (5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality) / 100.0


def jpeg_quantize(x: torch.Tensor, quality: int = 90) -> torch.Tensor:
    """JPEG-like lossy compression: YCbCr, 8x8 orthonormal DCT, quantise with the
    standard tables scaled by ``quality``, dequantise, inverse DCT, back to RGB.

    No chroma subsampling and no entropy coding (lossless anyway).  Images whose
    sides are not multiples of 8 are edge-padded and cropped back.
    """
    check_images(x)
    n, _, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
    dt, dev = x.dtype if x.dtype == torch.float64 else torch.float32, x.device
    xp = xp.to(dt) * 255.0
    to_ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                          dtype=dt, device=dev)
    ycc = torch.einsum("ck,nkhw->nchw", to_ycc, xp)
    ycc[:, 0] -= 128.0
    H, W = ycc.shape[2:]
    blocks = ycc.reshape(n, 3, H // 8, 8, W // 8, 8).permute(0, 1, 2, 4, 3, 5)  # n,c,bh,bw,8,8
    d = _dct_matrix().to(dtype=dt, device=dev)
    coef = d @ blocks @ d.T
    s = _quality_scale(quality)
    q = torch.stack([torch.tensor(_JPEG_LUMA, dtype=dt, device=dev)] +
                    [torch.tensor(_JPEG_CHROMA, dtype=dt, device=dev)] * 2)
    q = torch.clamp(torch.floor(q * s + 0.5), min=1.0)[None, :, None, None]
    coef = torch.round(coef / q) * q
    blocks = d.T @ coef @ d
    ycc = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, 3, H, W)
    ycc[:, 0] += 128.0
    from_ycc = torch.linalg.inv(to_ycc)
    rgb = torch.einsum("ck,nkhw->nchw", from_ycc, ycc) / 255.0
    return rgb[:, :, :h, :w].clamp(0.0, 1.0).to(x.dtype)


# --------------------------------------------------------------------------- pipelines
def process(
    raw_rgb: torch.Tensor,
    wb_gains=(1.0, 1.0, 1.0),
    ccm=None,
    gamma: float | torch.Tensor | None = None,
    tone: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Forward ISP from demosaiced linear camera RGB to display-referred RGB.

    WB -> CCM -> clip -> encode (``gamma=None`` uses the exact sRGB curve, a
    number uses a power law) -> tone curve -> clip.
    """
    check_images(raw_rgb)
    x = apply_white_balance(raw_rgb, wb_gains)
    if ccm is not None:
        x = apply_ccm(x, ccm)
    x = x.clamp(0.0, 1.0)
    x = linear_to_srgb(x) if gamma is None else apply_gamma(x, gamma)
    x = apply_tone_curve(x, tone)
    return x.clamp(0.0, 1.0)


def unprocess(
    srgb: torch.Tensor,
    wb_gains=(1.0, 1.0, 1.0),
    ccm=None,
    gamma: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Invert :func:`process` (without tone curve) back to a raw-like linear camera RGB.

    Following "Unprocessing images" (Brooks et al., CVPR 2019): decode the
    transfer curve, invert the CCM, divide out the white-balance gains.  Pass
    the result through :func:`mosaic` for a Bayer raw.  Clipped highlights
    cannot be recovered, so the round trip is exact only for unclipped inputs.
    """
    check_images(srgb)
    x = srgb_to_linear(srgb) if gamma is None else apply_gamma(srgb, 1.0 / torch.as_tensor(gamma, dtype=srgb.dtype))
    if ccm is not None:
        m = torch.as_tensor(ccm, dtype=srgb.dtype, device=srgb.device)
        x = apply_ccm(x, torch.linalg.inv(m))
    g = torch.as_tensor(wb_gains, dtype=srgb.dtype, device=srgb.device)
    return apply_white_balance(x, 1.0 / g)


@dataclass(frozen=True)
class RandomISPConfig:
    """Ranges of the random ISP transformation used as data diversification.

    Defaults follow HeteroSwitch's description (random white balance and
    gamma).  The ranges are our assumption (the paper body was not available):
    red/blue gains relative to green are drawn log-uniformly in
    ``wb_range``; the encoding gamma log-uniformly in ``gamma_range``.  The
    other stages are off unless enabled.  ``p`` is the per-image probability of
    being transformed at all.
    """

    wb_range: tuple[float, float] = (0.6, 1.6)
    gamma_range: tuple[float, float] = (0.6, 1.6)
    tone_range: tuple[float, float] = (0.0, 0.0)
    noise_shot_max: float = 0.0
    noise_read_max: float = 0.0
    jpeg_quality_range: tuple[int, int] | None = None
    p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("wb_range", "gamma_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")


def _log_uniform(n: int, lo: float, hi: float, g: torch.Generator, dtype, device) -> torch.Tensor:
    u = torch.rand(n, generator=g, dtype=torch.float64, device=g.device).to(device=device)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).to(dtype)


class RandomISP:
    """Seedable random ISP transformation: unprocess sRGB to linear, apply random
    WB gains (and optionally tone / noise / JPEG), re-encode with a random gamma.

    The transform works in linear light so that "white balance" means what it
    means on a camera.  With neutral ranges (gains 1, gamma 1) it is the
    identity up to the sRGB round trip (<= 1e-5).  All randomness comes from the
    ``torch.Generator`` passed to :meth:`__call__`, so a given seed reproduces
    the same images bit for bit.
    """

    def __init__(self, config: RandomISPConfig | None = None) -> None:
        self.config = config or RandomISPConfig()

    def sample_params(self, n: int, generator: torch.Generator, dtype=torch.float32, device="cpu") -> dict:
        c = self.config
        gains = torch.ones(n, 3, dtype=dtype, device=device)
        gains[:, 0] = _log_uniform(n, *c.wb_range, generator, dtype, device)
        gains[:, 2] = _log_uniform(n, *c.wb_range, generator, dtype, device)
        gamma = _log_uniform(n, *c.gamma_range, generator, dtype, device)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).to(device)
        tone = (c.tone_range[0] + u * (c.tone_range[1] - c.tone_range[0])).to(dtype)
        apply = (torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device) < c.p).to(device)
        return {"gains": gains, "gamma": gamma, "tone": tone, "apply": apply}

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(x)
        c = self.config
        p = self.sample_params(x.shape[0], generator, x.dtype, x.device)
        lin = srgb_to_linear(x.clamp(0.0, 1.0))
        lin = apply_white_balance(lin, p["gains"])
        # keep the brightest channel gain from clipping the whole image: normalise by max gain
        lin = (lin / p["gains"].amax(dim=1)[:, None, None, None]).clamp(0.0, 1.0)
        if c.noise_shot_max > 0 or c.noise_read_max > 0:
            u = torch.rand(2, generator=generator, dtype=torch.float64, device=generator.device).tolist()
            lin = add_sensor_noise(lin, c.noise_shot_max * u[0], c.noise_read_max * u[1], generator).clamp(0, 1)
        out = linear_to_srgb(lin)
        # random gamma applied on top of the sRGB encoding (a gamma of 1 keeps sRGB)
        out = apply_gamma(out, p["gamma"])
        if c.tone_range != (0.0, 0.0):
            out = apply_tone_curve(out, p["tone"])
        if c.jpeg_quality_range is not None:
            lo, hi = c.jpeg_quality_range
            q = int(torch.randint(lo, hi + 1, (1,), generator=generator, device=generator.device).item())
            out = jpeg_quantize(out.clamp(0, 1), q)
        out = out.clamp(0.0, 1.0)
        keep = ~p["apply"]
        if keep.any():
            out = torch.where(keep[:, None, None, None], x, out)
        return out
