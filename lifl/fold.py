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

import bisect
from typing import Mapping, Sequence

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


def as_f64(layout: Layout, buf, out: np.ndarray) -> np.ndarray:
    """The model in ``buf`` (flat layout) as one float64 vector (the accumulator's element order)."""
    views = layout.views(buf, public=False)
    for s, e in zip(layout.specs, layout.elem_offsets):
        src, kid = views[s.name].reshape(-1), kernel_id(s.dtype)
        if kid == 3:            # bfloat16 raw words
            out[e:e + s.numel] = _as_f64(src, kid)
        else:                   # one pass, no temporary
            np.copyto(out[e:e + s.numel], src, casting="unsafe")
    return out


def fold_arrays(acc: np.ndarray, sources: Sequence[np.ndarray], weights: Sequence[float], kid: int) -> None:
    """acc += Σ wₖ·xₖ for flat sources of one storage dtype (kernel id ``kid``)."""
    for start in range(0, len(sources), MAX_FUSE):
        src, w = sources[start:start + MAX_FUSE], [float(x) for x in weights[start:start + MAX_FUSE]]
        if _foldc is not None:
            _foldc.fold(acc, src, w, kid)
        else:
            for x, wk in zip(src, w):
                acc += wk * _as_f64(x, kid)


class UpdateViews:
    """Per-tensor flat storage views of one update buffer, cached by the caller per (slot, layout)."""

    __slots__ = ("views",)

    def __init__(self, layout: Layout, buf):
        self.views = [np.frombuffer(buf, dtype=storage_dtype(s.dtype), count=s.numel, offset=off)
                      for s, off in zip(layout.specs, layout.offsets)]


def fold_updates(acc: np.ndarray, layout: Layout, updates: Sequence[UpdateViews], weights: Sequence[float]) -> None:
    """Fold client updates (native layout) into a float64 accumulator of ``layout.numel`` elements."""
    for i, (spec, e) in enumerate(zip(layout.specs, layout.elem_offsets)):
        fold_arrays(acc[e:e + spec.numel], [u.views[i] for u in updates], weights, kernel_id(spec.dtype))


#: Elements of the float64 sum folded and committed as one piece (1 MiB: it stays in cache
#: between saving it and folding into it).
PIECE = 1 << 17
_HEADER = 64  # journal bytes before the piece generations: [piece being folded, its new generation]


def journal_bytes(numel: int) -> int:
    """Size of the journal that lets folds into an accumulator of ``numel`` run in place."""
    return _HEADER + 8 * -(-numel // PIECE) + 8 * min(numel, PIECE) + 64


class Journal:
    """How far in-place folds into one accumulator got, in shared memory beside it.

    An accumulator carries a generation per piece; a fold takes every piece from
    generation ``a`` to a new, never reused ``b``: it saves the piece in a one-piece
    undo area, records (piece, b), folds into the piece in place and marks it. A fold
    cut short (its function was killed) is simply sent again: pieces at ``b`` are
    skipped, the piece it was in is restored from the undo area, the rest still hold
    their generation-``a`` values. So every update is folded exactly once, with one
    piece of spare memory instead of a second float64 accumulator.
    """

    def __init__(self, buf, numel: int):
        n = -(-numel // PIECE)
        self.numel = numel
        self.head = np.frombuffer(buf, np.int64, 2, 0)
        self.gens = np.frombuffer(buf, np.int64, n, _HEADER)
        off = _HEADER + 8 * n
        off += -off % 64
        self.undo = np.frombuffer(buf, np.float64, min(numel, PIECE), off)


def fold_in_place(acc: np.ndarray, journal: Journal, to_gen: int, from_gen: int | None, add,
                  then=None) -> None:
    """Bring ``acc`` from generation ``from_gen`` (None: logically zero, whatever its bytes) to
    ``to_gen`` with ``add(out, e0, e1)``, which adds Σ sources[e0:e1] into out. Re-running the
    same call after it was cut short at any point gives exactly the uninterrupted result.
    ``then(piece, e0, e1)`` is called with every piece once it is at ``to_gen`` (while it is
    still in cache: :func:`fold_and_finalize`)."""
    head, gens, undo = journal.head, journal.gens, journal.undo
    for k in range(len(gens)):
        g = int(gens[k])
        e0, e1 = k * PIECE, min(journal.numel, (k + 1) * PIECE)
        dst = acc[e0:e1]
        if g == to_gen:
            if then is not None:
                then(dst, e0, e1)
            continue
        if from_gen is None:             # no old value to keep: start the piece from zero
            dst[:] = 0.0
        elif head[1] == to_gen and head[0] == k:
            dst[:] = undo[:e1 - e0]      # cut short inside this piece: restore it first
        elif g != from_gen:
            raise RuntimeError(f"accumulator piece {k} is at generation {g}, expected {from_gen} or {to_gen}")
        else:
            head[1] = -1                 # the undo area is being rewritten
            undo[:e1 - e0] = dst
            head[0] = k
            head[1] = to_gen             # the undo area holds piece k as it was before this fold
        add(dst, e0, e1)
        gens[k] = to_gen
        if then is not None:
            then(dst, e0, e1)


def _tensor_ranges(layout: Layout) -> tuple[list[int], list[int]]:
    starts = list(layout.elem_offsets)
    return starts, [t0 + spec.numel for t0, spec in zip(starts, layout.specs)]


def add_updates(layout: Layout, updates: Sequence[UpdateViews], weights: Sequence[float]):
    """An ``add`` for :func:`fold_in_place` over client updates in their native dtypes."""
    starts, ends = _tensor_ranges(layout)
    kids = [kernel_id(spec.dtype) for spec in layout.specs]
    weights = [float(w) for w in weights]

    def add(out: np.ndarray, e0: int, e1: int) -> None:
        i = bisect.bisect_right(starts, e0) - 1
        while i < len(starts) and starts[i] < e1:
            a, b = max(e0, starts[i]), min(e1, ends[i])
            if a < b:
                t0 = starts[i]
                fold_arrays(out[a - e0:b - e0], [u.views[i][a - t0:b - t0] for u in updates], weights, kids[i])
            i += 1
    return add


def add_partials(partials: Sequence[np.ndarray]):
    """An ``add`` for :func:`fold_in_place` over children's float64 partial sums."""
    ones = [1.0] * len(partials)

    def add(out: np.ndarray, e0: int, e1: int) -> None:
        fold_arrays(out, [p[e0:e1] for p in partials], ones, 1)
    return add


def fold_partials(acc: np.ndarray, partials: Sequence[np.ndarray]) -> None:
    """acc += Σ partialₖ (children's float64 weighted sums)."""
    fold_arrays(acc, partials, [1.0] * len(partials), 1)


def _check_weight(total_weight: float) -> None:
    if not total_weight > 0:
        raise ValueError(f"total weight must be > 0, got {total_weight}")


def _mean_into(src: np.ndarray, spec, total_weight: float, dst: np.ndarray) -> None:
    """dst (flat, the tensor's public dtype) = src / total_weight: floats cast, integers rounded
    to nearest and clipped to their range, bools true above one half."""
    if spec.dtype == "float64" and not np.isfinite(src).all():
        # finite float64 values times weights up to 2**53 can still overflow the sum; narrower
        # floats cannot. A non-finite mean is refused, never published as a result.
        raise ValueError(f"tensor {spec.name[:64]!r}: the weighted sum overflowed float64 (values × "
                         "num_examples too large); the round has no finite result")
    if _foldc is not None and spec.dtype in ("float32", "float64"):
        _foldc.mean_to(src, dst, total_weight, kernel_id(spec.dtype))
        return
    mean = np.divide(src, total_weight)
    if is_float(spec.dtype):
        dst[...] = mean.astype(public_dtype(spec.dtype))
    elif spec.dtype == "bool":
        dst[...] = mean > 0.5
    else:
        info = np.iinfo(storage_dtype(spec.dtype))
        dst[...] = np.clip(np.rint(mean), info.min, info.max).astype(dst.dtype)


def _flat_views(layout: Layout, out_buf) -> list[np.ndarray]:
    return [v.reshape(-1) for v in layout.views(out_buf).values()]


def finalize(acc: np.ndarray, layout: Layout, total_weight: float, out_buf) -> None:
    """Write acc / total_weight into ``out_buf`` in the layout's native dtypes."""
    _check_weight(total_weight)
    for spec, e, dst in zip(layout.specs, layout.elem_offsets, _flat_views(layout, out_buf)):
        _mean_into(acc[e:e + spec.numel], spec, total_weight, dst)


def fold_and_finalize(acc: np.ndarray, journal: Journal, to_gen: int, from_gen: int | None, add,
                      layout: Layout, total_weight: float, out_buf) -> None:
    """A round's last fold and its finalize as one pass: each piece of the sum is folded and its
    mean written out while it is still in cache, so the float64 sum is not read back from memory.
    Journaled like :func:`fold_in_place`: a re-run after being cut short is exact."""
    _check_weight(total_weight)
    starts, ends = _tensor_ranges(layout)
    outs = _flat_views(layout, out_buf)

    def then(piece: np.ndarray, e0: int, e1: int) -> None:
        i = bisect.bisect_right(starts, e0) - 1
        while i < len(starts) and starts[i] < e1:
            a, b = max(e0, starts[i]), min(e1, ends[i])
            if a < b:
                _mean_into(piece[a - e0:b - e0], layout.specs[i], total_weight, outs[i][a - starts[i]:b - starts[i]])
            i += 1
    fold_in_place(acc, journal, to_gen, from_gen, add, then)


def finalize_arrays(sums: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray],
                    total_weight: float) -> dict[str, np.ndarray]:
    """:func:`finalize` for float64 weighted sums kept per tensor: Σwᵢxᵢ / Σwᵢ in the dtype and
    shape of each tensor of ``like``.

    Why: code that accumulates outside the server (a local FedAvg fallback, a test's reference)
    must finalize exactly as the server does, so it calls this rather than its own cast.
    """
    layout = Layout.from_arrays(like)
    acc = np.empty(layout.numel, np.float64)
    for spec, e in zip(layout.specs, layout.elem_offsets):
        acc[e:e + spec.numel] = np.asarray(sums[spec.name], np.float64).reshape(-1)
    out = bytearray(layout.total_size)
    finalize(acc, layout, total_weight, out)
    return layout.views(out)


def _float_pieces(layout: Layout, buf, start: int, end: int | None):
    """(tensor name, storage view, kernel id) of each float tensor's elements lying wholly
    inside the byte range [start, end) of the flat layout."""
    end = layout.total_size if end is None else end
    for spec, off in zip(layout.specs, layout.offsets):
        if not is_float(spec.dtype) or spec.numel == 0 or off + spec.nbytes <= start or off >= end:
            continue
        size = spec.itemsize
        first = max(0, -(-(start - off) // size))
        last = min(spec.numel, (end - off) // size)
        if last > first:
            yield spec.name, np.frombuffer(buf, dtype=storage_dtype(spec.dtype), count=last - first,
                                           offset=off + first * size), kernel_id(spec.dtype)


def count_nonfinite(layout: Layout, buf, start: int = 0, end: int | None = None) -> list[tuple[str, int]]:
    """(tensor name, count) of NaN/Inf values in each float tensor that has any.

    With ``start``/``end`` (byte positions in the flat layout) only the elements lying
    wholly inside [start, end) are checked, so a receiver can check each chunk as it
    lands and spread the scan over the stream instead of paying it after the last byte.
    """
    bad = []
    for name, raw, kid in _float_pieces(layout, buf, start, end):
        if _foldc is not None:
            n = _foldc.count_nonfinite(raw, kid)
        else:
            n = int(np.count_nonzero(~np.isfinite(_as_f64(raw, kid))))
        if n:
            bad.append((name, n))
    return bad


def scan_floats(layout: Layout, buf, start: int = 0, end: int | None = None) -> tuple[list[tuple[str, int]], float]:
    """NaN/Inf counts (as count_nonfinite) and Σx² in float64 over the float tensors' elements
    inside [start, end), in one pass: an update's L2 norm is accumulated chunk by chunk while it
    lands, reading each byte once with the NaN/Inf check."""
    bad, total = [], 0.0
    for name, raw, kid in _float_pieces(layout, buf, start, end):
        if _foldc is not None:
            n, sq = _foldc.scan(raw, kid)
        else:
            x = _as_f64(raw, kid)
            n, sq = int(np.count_nonzero(~np.isfinite(x))), float(np.einsum("i,i->", x, x))  # einsum: no BLAS threads
        total += sq
        if n:
            bad.append((name, n))
    return bad, total


def sum_squares(layout: Layout, buf, start: int = 0, end: int | None = None) -> float:
    """Σx² in float64 over the float tensors' elements inside [start, end)."""
    return scan_floats(layout, buf, start, end)[1]


def scale_floats(layout: Layout, buf, factor: float) -> None:
    """Multiply every float tensor in ``buf`` by ``factor`` in place: computed in float64,
    rounded once to the tensor's dtype (integer and bool tensors are left as they are)."""
    for spec, off in zip(layout.specs, layout.offsets):
        if is_float(spec.dtype) and spec.numel:
            view = np.frombuffer(buf, dtype=public_dtype(spec.dtype), count=spec.numel, offset=off)
            for a in range(0, spec.numel, PIECE):   # cache-sized temporaries, not a float64 copy of the model
                part = view[a:a + PIECE]
                part[...] = (part.astype(np.float64) * factor).astype(view.dtype)
