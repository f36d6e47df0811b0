"""Fold kernels: exact weighted FedAvg accumulated in float64.

Pure functions over numpy buffers, no processes or I/O. Every stage of the
hierarchy uses them: a leaf folds client updates (native dtypes) into a float64
accumulator, a middle/top folds its children's float64 partial sums, and the
top finalises Σwᵢxᵢ / Σwᵢ back into each tensor's dtype.

Why float64: it makes the result independent of arrival order and hierarchy
shape to ~1e-16 relative before the final cast, and with the fused C kernel
(several pending updates per pass over a cache-sized block) it is as fast as a
float32 accumulator would be, because the pass is bound by reading updates.

Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are averaged with the
same weights and rounded to nearest (ties to even), then clipped to the dtype's
range, instead of being zeroed or truncated; ``bool`` tensors become the
weighted majority (ties give False).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .layout import Layout, is_float, kernel_id, public_dtype, storage_dtype

try:
    from . import _foldc
except ImportError:  # pragma: no cover - built at install time when a C compiler exists
    _foldc = None

#: Most updates folded in one pass (bounded by the kernel's limit of 64).
MAX_FUSE = 16

def have_c_kernel() -> bool:
    return _foldc is not None


def _as_f64(x: np.ndarray, kid: int) -> np.ndarray:
    if kid == 3:  # bfloat16 raw words -> float32 -> float64
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def fold_arrays(acc: np.ndarray, sources: Sequence[np.ndarray], weights: Sequence[float], kid: int,
                base: np.ndarray | None = None) -> None:
    """acc += Σ wₖ·xₖ for flat sources of one storage dtype (kernel id ``kid``).

    With ``base``: acc = base + Σ wₖ·xₖ, leaving base untouched (how functions fold,
    so that a fold cut short by a crash can be re-run from base exactly once).
    """
    if not len(sources):
        if base is not None:
            np.copyto(acc, base)
        return
    for start in range(0, len(sources), MAX_FUSE):
        src, w = sources[start:start + MAX_FUSE], [float(x) for x in weights[start:start + MAX_FUSE]]
        if _foldc is not None:
            _foldc.fold(acc, src, w, kid, base)
        else:
            if base is not None:
                np.copyto(acc, base)
            for x, wk in zip(src, w):
                acc += wk * _as_f64(x, kid)
        base = None


class UpdateViews:
    """Per-tensor flat storage views of one update buffer, cached by the caller per (slot, layout)."""

    __slots__ = ("views",)

    def __init__(self, layout: Layout, buf):
        self.views = [np.frombuffer(buf, dtype=storage_dtype(s.dtype), count=s.numel, offset=off)
                      for s, off in zip(layout.specs, layout.offsets)]


def fold_updates(acc: np.ndarray, layout: Layout, updates: Sequence[UpdateViews], weights: Sequence[float],
                 base: np.ndarray | None = None) -> None:
    """Fold client updates (native layout) into a float64 accumulator of ``layout.numel`` elements."""
    for i, (spec, e) in enumerate(zip(layout.specs, layout.elem_offsets)):
        fold_arrays(acc[e:e + spec.numel], [u.views[i] for u in updates], weights, kernel_id(spec.dtype),
                    None if base is None else base[e:e + spec.numel])


def fold_partials(acc: np.ndarray, partials: Sequence[np.ndarray], base: np.ndarray | None = None) -> None:
    """acc += Σ partialₖ (children's float64 weighted sums); with base, acc = base + Σ."""
    fold_arrays(acc, partials, [1.0] * len(partials), 1, base)


def finalize(acc: np.ndarray, layout: Layout, total_weight: float, out_buf) -> None:
    """Write acc / total_weight into ``out_buf`` in the layout's native dtypes."""
    if not total_weight > 0:
        raise ValueError(f"total weight must be > 0, got {total_weight}")
    out = layout.views(out_buf)
    for spec, e in zip(layout.specs, layout.elem_offsets):
        dst = out[spec.name]
        if _foldc is not None and spec.dtype in ("float32", "float64"):
            _foldc.mean_to(acc[e:e + spec.numel], dst.reshape(-1), total_weight, kernel_id(spec.dtype))
            continue
        mean = np.divide(acc[e:e + spec.numel], total_weight).reshape(spec.shape)
        if is_float(spec.dtype):
            dst[...] = mean.astype(public_dtype(spec.dtype))
        elif spec.dtype == "bool":
            dst[...] = mean > 0.5
        else:
            info = np.iinfo(storage_dtype(spec.dtype))
            dst[...] = np.clip(np.rint(mean), info.min, info.max).astype(dst.dtype)


def count_nonfinite(layout: Layout, buf, start: int = 0, end: int | None = None) -> list[tuple[str, int]]:
    """(tensor name, count) of NaN/Inf values in each float tensor that has any.

    With ``start``/``end`` (byte positions in the flat layout) only the elements lying
    wholly inside [start, end) are checked, so a receiver can check each chunk as it
    lands and spread the scan over the stream instead of paying it after the last byte.
    """
    end = layout.total_size if end is None else end
    bad = []
    for spec, off in zip(layout.specs, layout.offsets):
        if not is_float(spec.dtype) or spec.numel == 0 or off + spec.nbytes <= start or off >= end:
            continue
        size = spec.itemsize
        first = max(0, -(-(start - off) // size))
        last = min(spec.numel, (end - off) // size)
        if last <= first:
            continue
        kid = kernel_id(spec.dtype)
        raw = np.frombuffer(buf, dtype=storage_dtype(spec.dtype), count=last - first, offset=off + first * size)
        if _foldc is not None:
            n = _foldc.count_nonfinite(raw, kid)
        else:
            n = int(np.count_nonzero(~np.isfinite(_as_f64(raw, kid))))
        if n:
            bad.append((spec.name, n))
    return bad
