"""Compressed update encodings: what each tensor of an encoded update occupies, and where.

An update is pushed in one encoding chosen by its client (``ENCODING_*`` in the contract).
Only float32 and float64 tensors are encoded; the others travel as they are, so BatchNorm
counters stay exact. The encoded bytes keep the flat layout's rules (spec order, 64-byte
aligned tensors) and are what a shared-memory slot holds: the fold kernels decode them in
their inner loop, so an update never exists as float32 on the server and a slot is as small
as the wire bytes (``docs/encodings.md``).

A slot says how it is encoded: a RAW slot is exactly the layout's size (as before encodings
existed); an encoded one ends in a 64-byte trailer naming its encoding, and its size is chosen
never to equal a RAW slot's, so a reader can tell them apart whoever filled it.

Pure functions and frozen dataclasses; no processes, no I/O.
"""
from __future__ import annotations

import bisect
import enum
import functools
import struct
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from .errors import quote
from .layout import ALIGN, Layout, TensorSpec, align, kernel_id

try:
    from . import _foldc
except ImportError:  # pragma: no cover - built at install time when a C compiler exists
    _foldc = None

BLOCK = 256                              # int8 elements sharing one float32 scale
MAX_SCALE = float(np.finfo(np.float32).max) / 128  # |q * scale| stays a finite float32 for any int8 q
ENCODABLE = ("float32", "float64")       # dtypes an encoding applies to; the rest travel raw

#: Kernel ids of encoded values (raw dtypes use lifl.layout's ids 0..9).
K_F16, K_BF16, K_Q8 = 2, 3, 10


class Encoding(enum.IntEnum):
    """The contract's ``Encoding`` values (``lifl.v1.Encoding``)."""

    RAW = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT8_BLOCK256 = 4


#: Names accepted by the client, the CLI and the Flower mod.
NAMES = {"raw": Encoding.RAW, "float32": Encoding.RAW, "float16": Encoding.FLOAT16,
         "bfloat16": Encoding.BFLOAT16, "int8": Encoding.INT8_BLOCK256}


def parse(value: "str | int | Encoding | None") -> Encoding:
    """An encoding from a name (``raw``, ``float16``, ``bfloat16``, ``int8``) or a contract value
    (0, ENCODING_UNSPECIFIED, means RAW). ValueError names the choices."""
    if value is None or value == 0:
        return Encoding.RAW
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("encoding_")
        if key in NAMES:
            return NAMES[key]
        if key.upper() in Encoding.__members__:
            return Encoding[key.upper()]
        raise ValueError(f"unknown encoding {value!r}; use one of {', '.join(n for n in NAMES if n != 'float32')}")
    try:
        return Encoding(int(value))
    except ValueError:
        raise ValueError(f"unknown encoding {value!r}; the contract defines "
                         f"{', '.join(f'{e.value} ({e.name})' for e in Encoding)}") from None


@dataclass(frozen=True)
class Part:
    """One tensor in an encoded update: its values' kernel id, byte offset and byte count. For
    INT8_BLOCK256 the ``scales`` float32 scales come first and the int8 values follow them."""

    kid: int
    offset: int
    nbytes: int
    scales: int = 0

    @property
    def values_offset(self) -> int:
        return self.offset + 4 * self.scales


def _part(spec: TensorSpec, encoding: Encoding, offset: int) -> Part:
    if encoding is Encoding.RAW or spec.dtype not in ENCODABLE:
        return Part(kernel_id(spec.dtype), offset, spec.nbytes)
    if encoding is Encoding.INT8_BLOCK256:
        blocks = -(-spec.numel // BLOCK)
        return Part(K_Q8, offset, 4 * blocks + spec.numel, blocks)
    return Part(K_F16 if encoding is Encoding.FLOAT16 else K_BF16, offset, 2 * spec.numel)


@dataclass(frozen=True)
class EncodedLayout:
    """Where each tensor of ``layout`` lies in an update encoded with ``encoding``."""

    layout: Layout
    encoding: Encoding
    parts: tuple[Part, ...]
    total_size: int

    @functools.cached_property
    def scan_table(self) -> tuple[tuple, tuple[int, ...]]:
        """:func:`_regions` as a tuple, and each region's end byte (ascending): a chunk's check
        finds the regions it overlaps by bisection, not by walking every tensor of the model."""
        regions = tuple(_regions(self))
        return regions, tuple(off + count * _STORE[what].itemsize for _, off, count, what, _ in regions)

    def element_checks(self, nonfinite: bool) -> "ElementChecks":
        """What the gateway's copy checks as each chunk lands: int8 block scales always, float
        values' NaN/Inf with ``nonfinite`` (``content_hash.ingest``)."""
        return self._element_checks[nonfinite]

    @functools.cached_property
    def _element_checks(self) -> dict[bool, "ElementChecks"]:
        return {nf: ElementChecks.of(self.scan_table[0], nf) for nf in (False, True)}

    @property
    def slot_size(self) -> int:
        """Bytes of a shared-memory slot holding such an update (see the module docstring)."""
        raw = max(self.layout.total_size, 1)       # a 0-byte segment is created with 1 byte
        if self.encoding is Encoding.RAW:
            return raw
        size = self.total_size + TRAILER
        return size + ALIGN if size == raw else size

    def describe(self, limit: int = 3) -> str:
        """How the byte count comes about, for error messages."""
        if self.encoding is Encoding.RAW:
            return "the size of the round's model in the flat layout (64-byte aligned tensors)"
        enc = [(s, p) for s, p in zip(self.layout.specs, self.parts) if s.dtype in ENCODABLE]
        if self.encoding is Encoding.INT8_BLOCK256:
            how = ", ".join(f"{s.name[:40]!r}: {p.scales} scales × 4 + {s.numel} int8 = {p.nbytes} bytes"
                            for s, p in enc[:limit])
            rule = f"each float tensor takes one float32 scale per block of {BLOCK} elements, then its int8 values"
        else:
            how = ", ".join(f"{s.name[:40]!r}: {s.numel} × 2 = {p.nbytes} bytes" for s, p in enc[:limit])
            rule = "each float tensor takes 2 bytes per element"
        more = f" (+{len(enc) - limit} more)" if len(enc) > limit else ""
        return (f"the round's model encoded as {self.encoding.name}: {rule}, other tensors as they are, "
                f"each at a 64-byte aligned offset ({how}{more})")


@functools.lru_cache(maxsize=64)
def encoded(layout: Layout, encoding: Encoding) -> EncodedLayout:
    parts, pos = [], 0
    for spec in layout.specs:
        pos = align(pos)
        p = _part(spec, Encoding(encoding), pos)
        parts.append(p)
        pos += p.nbytes
    return EncodedLayout(layout, Encoding(encoding), tuple(parts), pos)


# -- the slot trailer -----------------------------------------------------------------------------
TRAILER = ALIGN
_MAGIC = b"LIFLENC1"
_TRAILER = struct.Struct("<8sIQ")


def write_trailer(enc: EncodedLayout, buf) -> None:
    """Mark a slot of ``enc.slot_size`` bytes as holding an update in ``enc.encoding``."""
    if enc.encoding is not Encoding.RAW:
        end = enc.slot_size
        buf[end - TRAILER:end] = _TRAILER.pack(_MAGIC, int(enc.encoding), enc.total_size).ljust(TRAILER, b"\0")


def slot_encoding(layout: Layout, buf) -> EncodedLayout:
    """How the update in a slot (a buffer of exactly the slot's size) is encoded."""
    n = len(buf)
    if n in (layout.total_size, max(layout.total_size, 1)):   # a 0-byte slot is mapped with 1 byte
        return encoded(layout, Encoding.RAW)
    if n < TRAILER:
        raise ValueError(f"a slot of {n} bytes holds no update of this {layout.total_size}-byte model")
    magic, code, total = _TRAILER.unpack_from(bytes(buf[n - TRAILER:n - TRAILER + _TRAILER.size]))
    try:
        enc = encoded(layout, Encoding(code)) if magic == _MAGIC else None
    except ValueError:
        enc = None
    if enc is None or enc.total_size != total or enc.slot_size != n:
        raise ValueError(f"a slot of {n} bytes does not hold an update of this model in any encoding")
    return enc


# -- checking received bytes ---------------------------------------------------------------------
_SCALES, _Q8 = -1, -2   # int8 block scales, int8 values (the other regions are float kernel ids)
_STORE = {0: np.dtype("<f4"), 1: np.dtype("<f8"), K_F16: np.dtype("<f2"), K_BF16: np.dtype("<u2"),
          _SCALES: np.dtype("<f4"), _Q8: np.dtype("i1")}


def _regions(enc: EncodedLayout) -> Iterator[tuple[str, int, int, int, int]]:
    """(tensor name, byte offset, count, kind, scales' offset) of every float array of an encoded
    update: float values (kind: their kernel id), int8 block scales (``_SCALES``) and the int8
    values (``_Q8``, whose scales lie at the last field) — in stream order, scales before values."""
    for spec, p in zip(enc.layout.specs, enc.parts):
        if p.kid == K_Q8:
            yield spec.name, p.offset, p.scales, _SCALES, p.offset
            yield spec.name, p.values_offset, spec.numel, _Q8, p.offset
        elif p.kid in (0, 1, K_F16, K_BF16) and spec.numel:
            yield spec.name, p.offset, spec.numel, p.kid, 0


CHECK_SCALE = 100   # the copy kernel's kind for int8 block scales (float kinds are kernel ids)


def _refusal(name: str, what: int, bad: int) -> str:
    if what == _SCALES:
        return (f"tensor {quote(name)} has {bad} int8 block scale(s) that are NaN, Inf or larger than "
                f"{MAX_SCALE:.4g} in magnitude (a decoded value must be a finite float32); the update was rejected")
    return f"tensor {quote(name)} has {bad} NaN/Inf values; the update was rejected (reject_nonfinite is on)"


@dataclass(frozen=True)
class ElementChecks:
    """The regions whose elements the gateway's copy kernel checks in the same pass as it copies
    and hashes each chunk (``content_hash.ingest``): a stream's chunks check every element once,
    from L1, where a separate pass re-read each chunk from memory."""

    table: np.ndarray            # int64 (byte offset, end, kind) per region, ascending
    names: tuple[str, ...]
    whats: tuple[int, ...]       # each region's kind as ``_regions`` gives it
    max_scale: float = MAX_SCALE

    @classmethod
    def of(cls, regions, nonfinite: bool) -> "ElementChecks":
        rows = [(off, off + count * _STORE[what].itemsize, CHECK_SCALE if what == _SCALES else what, name, what)
                for name, off, count, what, _ in regions if what == _SCALES or (nonfinite and what >= 0)]
        table = np.array([r[:3] for r in rows], np.int64).reshape(-1, 3)
        return cls(table, tuple(r[3] for r in rows), tuple(r[4] for r in rows))

    def why(self, region: int, bad: int) -> str:
        """The refusal for ``bad`` elements found in region ``region`` (an index of ``table``)."""
        return _refusal(self.names[region], self.whats[region], bad)


def scan_received(enc: EncodedLayout, buf, start: int, end: int, nonfinite: bool,
                  squares: bool) -> tuple[str | None, float]:
    """Check the elements lying wholly inside the bytes [start, end) of an update as received:
    (why it is refused or None, Σx² of their decoded float values when ``squares``). A receiver
    calls it for each chunk as it lands, so the check is spread over the stream.

    Int8 block scales must always be finite and at most :data:`MAX_SCALE` in magnitude; with
    ``nonfinite`` float values (raw or 16-bit encoded) must be finite too. A tensor's scales
    precede its values, so they are checked before any value they scale is squared."""
    from .fold import nonfinite_in, scan_in   # the kernels live there (fold imports this module)

    total = 0.0
    regions, ends = enc.scan_table
    for i in range(bisect.bisect_right(ends, start), len(regions)):
        name, off, count, what, scales_at = regions[i]
        if off >= end:
            break
        size = _STORE[what].itemsize
        if not (what == _SCALES or (squares if what == _Q8 else nonfinite or squares)):
            continue
        first = max(0, -(-(start - off) // size))
        last = min(count, (end - off) // size)
        if last <= first:
            continue
        raw = np.frombuffer(buf, dtype=_STORE[what], count=last - first, offset=off + first * size)
        if what == _SCALES:
            bad = int(np.count_nonzero(~(np.abs(raw) <= MAX_SCALE)))
            if bad:
                return _refusal(name, what, bad), total
            continue
        if what == _Q8:      # Σ (q·scale)² of these values, block by block
            b0 = first // BLOCK
            sc = np.frombuffer(buf, "<f4", -(-last // BLOCK) - b0, scales_at + 4 * b0).astype(np.float64)
            s2 = np.repeat(sc * sc, BLOCK)[first - b0 * BLOCK:last - b0 * BLOCK]
            q = raw.astype(np.float64)
            total += float(np.einsum("i,i,i->", s2, q, q))
            continue
        if squares:
            bad, sq = scan_in(raw, what)
            total += sq
        else:
            bad = nonfinite_in(raw, what)
        if bad and nonfinite:
            return _refusal(name, what, bad), total
    return None, total


def scale_encoded(enc: EncodedLayout, buf, factor: float) -> None:
    """Multiply every float tensor of an update in ``buf`` by ``factor`` in place, in its encoding:
    int8 scales are multiplied (the values stay), 16-bit words and raw floats are decoded, scaled
    in float64 and rounded once (an L2 clip, ``screen_mode = clip``)."""
    import ml_dtypes

    from .fold import PIECE
    from .layout import is_float, public_dtype
    for spec, p in zip(enc.layout.specs, enc.parts):
        if not spec.numel or not is_float(spec.dtype):
            continue
        if p.kid == K_Q8:
            sc = np.frombuffer(buf, "<f4", p.scales, p.offset)
            sc[...] = (sc.astype(np.float64) * factor).astype(np.float32)
            continue
        dt = (public_dtype(spec.dtype) if p.kid == kernel_id(spec.dtype)
              else np.dtype("<f2") if p.kid == K_F16 else np.dtype(ml_dtypes.bfloat16))
        view = np.frombuffer(buf, dt, spec.numel, p.offset)
        for a in range(0, spec.numel, PIECE):   # cache-sized temporaries, not a float64 copy of the model
            part = view[a:a + PIECE]
            part[...] = (part.astype(np.float64) * factor).astype(dt)


# -- encoding on the client ---------------------------------------------------------------------
def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantisation of a flat float array: (float32 scales, int8 values),
    ``scale = absmax / 127`` per block of :data:`BLOCK` (0 for an all-zero block), values
    ``rint(x / scale)``. Computed in the array's own precision (float32 stays float32): the
    server folds exactly what is sent, so this only decides how close the client's update is.
    Scales are capped at :data:`MAX_SCALE` (only values within 1 % of float32's largest are
    clipped by it); ValueError for NaN/Inf or values beyond float32's range."""
    x = np.asarray(x).reshape(-1)
    if x.dtype == np.float32 and _foldc is not None:       # one pass in C
        scales, values = np.empty(-(-x.size // BLOCK), np.float32), np.empty(x.size, np.int8)
        if _foldc.quantize_q8(np.ascontiguousarray(x), scales, values, MAX_SCALE):
            raise ValueError("NaN/Inf values cannot be quantised to int8")
        return scales, values
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    n = x.size
    blocks = -(-n // BLOCK)
    if n % BLOCK:
        x = np.concatenate([x, np.zeros(blocks * BLOCK - n, x.dtype)])
    body = x.reshape(blocks, BLOCK)
    absmax = np.abs(body).max(axis=1) if n else np.zeros(0, x.dtype)
    if not (absmax <= np.finfo(np.float32).max).all():
        raise ValueError("NaN/Inf values, or values beyond float32's range, cannot be quantised to int8")
    scales = np.minimum(absmax / 127, MAX_SCALE).astype(np.float32)
    div = scales.astype(x.dtype)
    div[div == 0] = 1                                  # an all-zero block: values 0 whatever the divisor
    q = np.rint(body / div[:, None])
    np.clip(q, -127, 127, out=q)
    return scales, q.astype(np.int8).reshape(-1)[:n]


def _encode_tensor(spec: TensorSpec, a: np.ndarray, encoding: Encoding) -> list[memoryview]:
    """The encoded bytes of one float tensor, as pieces to lay end to end. Values the encoding
    cannot carry are refused (found on the encoded words, so a valid tensor costs no extra pass)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    if encoding is Encoding.INT8_BLOCK256:
        try:
            scales, values = quantize_int8(flat)
        except ValueError as e:
            raise ValueError(f"tensor {spec.name!r}: {e}") from None
        return [memoryview(scales.astype("<f4").view(np.uint8)), memoryview(values.view(np.uint8))]
    if encoding is Encoding.FLOAT16:
        with np.errstate(over="ignore"):                    # overflow is reported below, by tensor name
            words = flat.astype("<f2").view("<u2")
        exp, top, other = 0x7C00, "±65504", "bfloat16 or int8"
    else:
        import ml_dtypes
        words = flat.astype(ml_dtypes.bfloat16).view("<u2")   # round to nearest even
        exp, top, other = 0x7F80, "about ±3.39e38", "int8"
    from .fold import nonfinite_in   # the vectorised scan lives with the kernels (fold imports this module)
    if nonfinite_in(words if exp == 0x7F80 else words.view("<f2"), K_BF16 if exp == 0x7F80 else K_F16):
        bad = (words & exp) == exp
        if not np.isfinite(flat[bad]).all():
            raise ValueError(f"tensor {spec.name!r} has NaN/Inf values; they cannot be encoded as {encoding.name}")
        raise ValueError(f"tensor {spec.name!r} has values beyond {encoding.name.lower()}'s range ({top}; e.g. "
                         f"{flat[bad][0]:g}); use {other}")
    return [memoryview(words.view(np.uint8))]


def encode_pieces(enc: EncodedLayout, arrays: Mapping[str, np.ndarray]) -> list[tuple[int, memoryview]]:
    """(byte offset, bytes) of every non-empty piece of ``arrays`` encoded as ``enc`` says; the
    gaps between them are alignment padding. Encoded tensors are materialised (at most half their
    float32 size); raw ones are views of the arrays. ValueError: arrays that do not fit the layout,
    or values the encoding cannot carry."""
    enc.layout.check_arrays(arrays)
    out = []
    for spec, p in zip(enc.layout.specs, enc.parts):
        a = np.asarray(arrays[spec.name])
        if p.kid != kernel_id(spec.dtype):     # an encoded tensor
            pos = p.offset
            for piece in _encode_tensor(spec, a, enc.encoding):
                out.append((pos, piece))
                pos += len(piece)
        else:
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            out.append((p.offset, memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))))
    return [(o, b) for o, b in out if len(b)]


def chunks(enc: EncodedLayout, pieces: list[tuple[int, memoryview]], chunk_size: int) -> Iterator[memoryview]:
    """An update's ``pieces`` (from :func:`encode_pieces`) as the flat encoded bytes, in chunks of
    exactly ``chunk_size`` bytes (the last may be shorter); a chunk lying inside one piece is a view."""

    def stream() -> Iterator[memoryview]:
        pos = 0
        for off, data in pieces:
            if off > pos:
                yield memoryview(bytes(off - pos))     # alignment padding (< 64 bytes)
            yield data
            pos = off + len(data)
        if enc.total_size > pos:
            yield memoryview(bytes(enc.total_size - pos))

    buf, fill = bytearray(chunk_size), 0
    for data in stream():
        i = 0
        while i < len(data):
            if fill == 0 and len(data) - i >= chunk_size:   # a whole chunk inside one piece: no copy
                yield data[i:i + chunk_size]
                i += chunk_size
                continue
            n = min(len(data) - i, chunk_size - fill)
            buf[fill:fill + n] = data[i:i + n]
            fill, i = fill + n, i + n
            if fill == chunk_size:
                yield memoryview(buf)
                buf, fill = bytearray(chunk_size), 0
    if fill:
        yield memoryview(buf)[:fill]
