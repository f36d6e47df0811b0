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

from .encoding import BLOCK, K_BF16, K_F16, K_Q8, EncodedLayout, slot_encoding
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


class Q8:
    """Int8 blockwise values (ENCODING_INT8_BLOCK256) of a run of elements: ``values[i]`` decodes
    to ``values[i] * scales[(i + phase) // BLOCK]`` (``phase``: the first element's place in its block).
    Sliced like the array it stands for."""

    __slots__ = ("scales", "values", "phase")

    def __init__(self, scales: np.ndarray, values: np.ndarray, phase: int = 0):
        self.scales, self.values, self.phase = scales, values, phase   # float32 of exactly their blocks; int8

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, sl: slice) -> "Q8":
        a, b, _ = sl.indices(len(self.values))
        b = max(a, b)
        a0, b0 = a + self.phase, b + self.phase
        return Q8(self.scales[a0 // BLOCK:-(-b0 // BLOCK)], self.values[a:b], a0 % BLOCK)


#: Elements a numpy fallback decodes at once: its temporaries stay this size, never an update's.
_TILE = 1 << 16


def _q8_numpy(acc: np.ndarray, src: Q8, w: float) -> None:
    for t in range(0, len(acc), _TILE):
        part = src[t:t + _TILE]
        n = len(part.values)
        ws = np.repeat(part.scales.astype(np.float64) * w, BLOCK)[part.phase:part.phase + n]
        acc[t:t + n] += ws * part.values


#: Elements per block of the C kernel's folds (its ``BLOCK``): the undo area begins with one
#: area of this size, where the kernel sums each block aside (:class:`Save`).
KERNEL_BLOCK = _foldc.BLOCK if _foldc is not None else 4096
_WHOLE = KERNEL_BLOCK   # where a whole-range copy of old values goes in the undo area


class Save:
    """How a journaled fold changes the accumulator (:func:`fold_in_place`): ``undo``, the
    journal's undo area, and ``mark``, a one-element int64 view of the journal's record of
    elements [a, b) of the piece, ``phase << 60 | a << 32 | b`` (the piece's elements before
    ``a`` are folded, those from ``b`` on untouched):

    * phase 0: the C kernel is summing [a, b) aside, in the undo area; the piece is untouched there;
    * phase 1: the undo area holds [a, b)'s new values, being copied in;
    * phase 2: the undo area (from ``_WHOLE``) holds [a, b)'s old values, which may be changing
      (:meth:`all_of`: where the folds that follow are not one kernel call that records its own
      blocks — mixed encodings, int8 sources, no C kernel).

    ``offset``: where the array being folded starts in the piece (``at``)."""

    __slots__ = ("undo", "mark", "offset")

    def __init__(self, undo: np.ndarray, mark: np.ndarray, offset: int = 0):
        self.undo, self.mark, self.offset = undo, mark, offset

    def at(self, a: int) -> "Save":
        """The same for an array that starts ``a`` elements further into the piece."""
        return Save(self.undo, self.mark, self.offset + a)

    def all_of(self, acc: np.ndarray) -> None:
        """Keep all of ``acc``'s old values now, in one copy, before it changes."""
        self.undo[_WHOLE:_WHOLE + len(acc)] = acc
        self.mark[0] = 2 << 60 | self.offset << 32 | (self.offset + len(acc))

    @staticmethod
    def recover(dst: np.ndarray, undo: np.ndarray, mark: int) -> int:
        """Make the piece ``dst`` consistent with the record ``mark`` after a fold was cut short:
        every element before the returned position is folded, every one from it on untouched."""
        phase, a, b = mark >> 60, (mark >> 32) & 0x0FFFFFFF, mark & 0xFFFFFFFF
        if phase == 1:     # the block's new values were complete: finish copying them in
            dst[a:b] = undo[:b - a]
            return b
        if phase == 2:     # a range's old values: put them back
            dst[a:b] = undo[_WHOLE:_WHOLE + b - a]
        return a


def fold_arrays(acc: np.ndarray, sources: Sequence, weights: Sequence[float], kid: int,
                save: Save | None = None) -> None:
    """acc += Σ wₖ·xₖ for flat sources of one storage kind (kernel id ``kid``: a layout dtype's,
    or ``encoding.K_Q8`` for :class:`Q8` sources, which all share one phase). ``save``: journaled
    (:class:`Save`): one float kernel call records its blocks itself, anything else keeps acc's
    old values first."""
    if save is not None and not (_foldc is not None and kid != K_Q8 and 0 < len(sources) <= MAX_FUSE):
        save.all_of(acc)
        save = None
    for start in range(0, len(sources), MAX_FUSE):
        src, w = sources[start:start + MAX_FUSE], [float(x) for x in weights[start:start + MAX_FUSE]]
        if save is not None:   # one kernel call: it sums each block aside and records it
            _foldc.fold(acc, src, w, kid, None, save.undo, save.mark, save.offset)
        elif kid == K_Q8:
            if _foldc is not None:
                _foldc.fold_q8(acc, [x.values for x in src], [x.scales for x in src], w,
                               src[0].phase if src else 0)
            else:
                for x, wk in zip(src, w):
                    _q8_numpy(acc, x, wk)
        elif _foldc is not None:
            _foldc.fold(acc, src, w, kid)
        else:
            for x, wk in zip(src, w):
                for t in range(0, len(acc), _TILE):
                    acc[t:t + _TILE] += wk * _as_f64(x[t:t + _TILE], kid)


_ENCODED_DTYPE = {K_F16: np.dtype("<f2"), K_BF16: np.dtype("<u2")}   # as layout stores float16 / bfloat16


class UpdateViews:
    """Per-tensor flat views of one update's slot, in the encoding the slot says it holds
    (``encoding.slot_encoding``); cached by the caller per (slot, layout). A slot is reused by
    later updates, possibly in another encoding of the same size: :meth:`refresh` re-reads it."""

    __slots__ = ("views", "kids", "layout", "buf", "encoding")

    def __init__(self, layout: Layout, buf):
        self.layout, self.buf = layout, buf
        self._build(slot_encoding(layout, buf))

    def _build(self, enc: EncodedLayout) -> None:
        self.encoding = enc.encoding
        self.kids = [p.kid for p in enc.parts]
        self.views = []
        for spec, p in zip(self.layout.specs, enc.parts):
            if p.kid == K_Q8:
                self.views.append(Q8(np.frombuffer(self.buf, "<f4", p.scales, p.offset),
                                     np.frombuffer(self.buf, np.int8, spec.numel, p.values_offset)))
            else:
                dt = storage_dtype(spec.dtype) if p.kid == kernel_id(spec.dtype) else _ENCODED_DTYPE[p.kid]
                self.views.append(np.frombuffer(self.buf, dt, spec.numel, p.offset))

    def refresh(self) -> "UpdateViews":
        enc = slot_encoding(self.layout, self.buf)
        if enc.encoding != self.encoding:
            self._build(enc)
        return self


def _fold_groups(out: np.ndarray, sources: list, kids: list[int], weights: list[float],
                 save: Save | None = None) -> None:
    """Fold sources of mixed kinds (updates in different encodings), one kernel call per kind
    (with ``save``: several calls over the same elements keep them all first)."""
    kinds = sorted(set(kids))
    if save is not None and len(kinds) > 1:
        save.all_of(out)
        save = None
    for kid in kinds:
        sel = [i for i, k in enumerate(kids) if k == kid]
        fold_arrays(out, [sources[i] for i in sel], [weights[i] for i in sel], kid, save)


def fold_updates(acc: np.ndarray, layout: Layout, updates: Sequence[UpdateViews], weights: Sequence[float]) -> None:
    """Fold client updates (in their slots' encodings) into a float64 accumulator of ``layout.numel`` elements."""
    updates = [u.refresh() for u in updates]
    weights = [float(w) for w in weights]
    for i, (spec, e) in enumerate(zip(layout.specs, layout.elem_offsets)):
        _fold_groups(acc[e:e + spec.numel], [u.views[i] for u in updates], [u.kids[i] for u in updates], weights)


#: Elements of the float64 sum folded and committed as one piece (1 MiB: a generation per piece
#: keeps the journal small; a re-sent fold skips whole pieces).
PIECE = 1 << 17
_HEADER = 64  # journal bytes before the piece generations: [piece being folded, its new generation,
#               the range of it that the undo area holds (Save)]


def _undo_elements(numel: int) -> int:
    return _WHOLE + min(numel, PIECE)


def journal_bytes(numel: int) -> int:
    """Size of the journal that lets folds into an accumulator of ``numel`` run in place."""
    return _HEADER + 8 * -(-numel // PIECE) + 8 * _undo_elements(numel) + 64


class Journal:
    """How far in-place folds into one accumulator got, in shared memory beside it.

    An accumulator carries a generation per piece; a fold takes every piece from
    generation ``a`` to a new, never reused ``b``: it records (piece, b), folds into the
    piece in place — the C kernel sums each block aside in a block-sized undo area and
    copies it in, recording which block and which step (:class:`Save`) — and marks the
    piece. A fold cut short (its function was killed) is simply sent again: pieces at ``b``
    are skipped, in the piece it was in the recorded block is finished or left as it was and
    the fold resumes after or at it (what came before is folded, what follows untouched), the
    other pieces still hold their generation-``a`` values. So every update is folded exactly
    once, with one piece of spare memory instead of a second float64 accumulator, and the
    accumulator is read once, beside the sources: no pass of its own.
    """

    def __init__(self, buf, numel: int):
        n = -(-numel // PIECE)
        self.numel = numel
        self.head = np.frombuffer(buf, np.int64, 3, 0)
        self.gens = np.frombuffer(buf, np.int64, n, _HEADER)
        off = _HEADER + 8 * n
        off += -off % 64
        self.undo = np.frombuffer(buf, np.float64, _undo_elements(numel), off)


def fold_in_place(acc: np.ndarray, journal: Journal, to_gen: int, from_gen: int | None, add,
                  then=None) -> None:
    """Bring ``acc`` from generation ``from_gen`` (None: logically zero, whatever its bytes) to
    ``to_gen`` with ``add(out, e0, e1)``, which adds Σ sources[e0:e1] into out (an ``add`` with a
    true ``saves`` attribute takes a :class:`Save` too and records in it how far it got:
    :func:`add_updates`, :func:`add_partials`; any other ``add`` gets its range's old values kept
    first). Re-running the same call after it
    was cut short at any point gives exactly the uninterrupted result. ``then(piece, e0, e1)``
    is called with every piece once it is at ``to_gen`` (while it is still in cache:
    :func:`fold_and_finalize`)."""
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
            add(dst, e0, e1)
        else:
            start = 0
            if head[1] == to_gen and head[0] == k:   # cut short inside this piece: resume
                start = Save.recover(dst, undo, int(head[2]))   # where it stood
            elif g != from_gen:
                raise RuntimeError(f"accumulator piece {k} is at generation {g}, expected {from_gen} or {to_gen}")
            else:
                head[1] = -1                 # the record is being rewritten
                head[0] = k
                head[2] = 0                  # nothing of piece k changed yet
                head[1] = to_gen             # from here head[2] says what the undo area holds (Save)
            save = Save(undo, head[2:3], start)
            if getattr(add, "saves", False):
                add(dst[start:], e0 + start, e1, save)
            else:
                save.all_of(dst[start:])
                add(dst[start:], e0 + start, e1)
        gens[k] = to_gen
        if then is not None:
            then(dst, e0, e1)


def _tensor_ranges(layout: Layout) -> tuple[list[int], list[int]]:
    starts = list(layout.elem_offsets)
    return starts, [t0 + spec.numel for t0, spec in zip(starts, layout.specs)]


def add_updates(layout: Layout, updates: Sequence[UpdateViews], weights: Sequence[float]):
    """An ``add`` for :func:`fold_in_place` over client updates in their slots' encodings."""
    starts, ends = _tensor_ranges(layout)
    updates = [u.refresh() for u in updates]
    weights = [float(w) for w in weights]

    def add(out: np.ndarray, e0: int, e1: int, save: Save | None = None) -> None:
        i = bisect.bisect_right(starts, e0) - 1
        while i < len(starts) and starts[i] < e1:
            a, b = max(e0, starts[i]), min(e1, ends[i])
            if a < b:
                t0 = starts[i]
                _fold_groups(out[a - e0:b - e0], [u.views[i][a - t0:b - t0] for u in updates],
                             [u.kids[i] for u in updates], weights,
                             save.at(a - e0) if save is not None else None)
            i += 1
    add.saves = True
    return add


def add_partials(partials: Sequence[np.ndarray]):
    """An ``add`` for :func:`fold_in_place` over children's float64 partial sums."""
    ones = [1.0] * len(partials)

    def add(out: np.ndarray, e0: int, e1: int, save: Save | None = None) -> None:
        fold_arrays(out, [p[e0:e1] for p in partials], ones, 1, save)
    add.saves = True
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


#: public name: other finalize paths (lifl.serverstep) write results exactly as finalize does
mean_into = _mean_into


def _flat_views(layout: Layout, out_buf) -> list[np.ndarray]:
    return [v.reshape(-1) for v in layout.views(out_buf).values()]


def finalize(acc: np.ndarray, layout: Layout, total_weight: float, out_buf) -> None:
    """Write acc / total_weight into ``out_buf`` in the layout's native dtypes."""
    _check_weight(total_weight)
    for spec, e, dst in zip(layout.specs, layout.elem_offsets, _flat_views(layout, out_buf)):
        _mean_into(acc[e:e + spec.numel], spec, total_weight, dst)


def _mean_writer(layout: Layout, total_weight: float, out_buf):
    """``write(piece, e0, e1)``: the mean of elements [e0, e1) of the sum (``piece``) into
    ``out_buf``, across tensor boundaries, in each tensor's dtype."""
    _check_weight(total_weight)
    starts, ends = _tensor_ranges(layout)
    outs = _flat_views(layout, out_buf)

    def write(piece: np.ndarray, e0: int, e1: int) -> None:
        i = bisect.bisect_right(starts, e0) - 1
        while i < len(starts) and starts[i] < e1:
            a, b = max(e0, starts[i]), min(e1, ends[i])
            if a < b:
                _mean_into(piece[a - e0:b - e0], layout.specs[i], total_weight, outs[i][a - starts[i]:b - starts[i]])
            i += 1
    return write


def fold_and_finalize(acc: np.ndarray, journal: Journal, to_gen: int, from_gen: int | None, add,
                      layout: Layout, total_weight: float, out_buf) -> None:
    """A round's last fold and its finalize as one pass: each piece of the sum is folded and its
    mean written out while it is still in cache, so the float64 sum is not read back from memory.
    Journaled like :func:`fold_in_place`: a re-run after being cut short is exact."""
    fold_in_place(acc, journal, to_gen, from_gen, add, _mean_writer(layout, total_weight, out_buf))


def span_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """[e0, e1) ranges splitting a model into about equal spans on ``PIECE`` boundaries."""
    pieces = -(-numel // PIECE)
    parts = max(1, min(parts, pieces))
    cuts = [round(k * pieces / parts) * PIECE for k in range(parts + 1)]
    return [(a, min(b, numel)) for a, b in zip(cuts, cuts[1:]) if a < min(b, numel)]


def finalize_span(layout: Layout, e0: int, e1: int, partials: Sequence[np.ndarray], add, total_weight: float,
                  out_buf, write=None) -> None:
    """The result's elements [e0, e1) = (Σ partial sums + what ``add`` adds) / total_weight, piece
    by piece in a cache-sized scratch: several functions finalise a round's spans in parallel.
    Reads its inputs only, so a re-run writes the same bytes. ``write(piece, a, b)`` replaces the
    mean (a server step: ``lifl.serverstep``)."""
    write = write or _mean_writer(layout, total_weight, out_buf)
    tmp = np.empty(min(PIECE, e1 - e0))
    for a in range(e0, e1, PIECE):
        b = min(e1, a + PIECE)
        t = tmp[:b - a]
        if partials:
            np.copyto(t, partials[0][a:b])
            if len(partials) > 1:
                fold_arrays(t, [p[a:b] for p in partials[1:]], [1.0] * (len(partials) - 1), 1)
        else:
            t[:] = 0.0
        if add is not None:
            add(t, a, b)
        write(t, a, b)


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
        n, sq = scan_in(raw, kid)
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


def nonfinite_in(raw: np.ndarray, kid: int) -> int:
    """NaN/Inf elements of a flat float array of kernel id ``kid`` (float16/bfloat16 as 16-bit words)."""
    if _foldc is not None:
        return _foldc.count_nonfinite(raw, kid)
    return int(np.count_nonzero(~np.isfinite(_as_f64(raw, kid))))


def scan_in(raw: np.ndarray, kid: int) -> tuple[int, float]:
    """(NaN/Inf count, Σx² in float64) of a flat float array of kernel id ``kid``, in one pass."""
    if _foldc is not None:
        return _foldc.scan(raw, kid)
    x = _as_f64(raw, kid)
    return int(np.count_nonzero(~np.isfinite(x))), float(np.einsum("i,i->", x, x))  # einsum: no BLAS threads
