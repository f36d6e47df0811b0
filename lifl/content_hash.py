"""The content hash that tells an identical retry from a different update (``rounds.Digest``).

h = Σ wᵢ·P^(m−1−i) mod 2⁶⁴ over the update's little-endian 8-byte words (the last one
zero-padded; the size is kept beside it), P odd: any change of a single word changes h, and
ranges compose (h of a‖b = h(a)·P^|b| + h(b)), so clients may chunk as they like. It is not a
cryptographic hash: a client that crafts a collision only gets its own second update answered as
a duplicate of its first (never folded). The C kernel (``_foldc.copy_hash``) computes it while it
copies each chunk into its slot, in cache-sized blocks: one pass where copy plus zlib's CRC-32
were two, the second at ~3–4 GiB/s. Without the kernel, numpy computes the same value.
"""
from __future__ import annotations

import numpy as np

try:
    from . import _foldc
except ImportError:  # pragma: no cover - depends on the build
    _foldc = None

P = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
_powers = np.ones(1, np.uint64)   # P^0 .. P^(n-1), grown on demand (the numpy path)


def _descending_powers(m: int) -> np.ndarray:
    """P^(m-1), ..., P^1, P^0 (mod 2⁶⁴)."""
    global _powers
    if len(_powers) < m:
        n = max(m, 2 * len(_powers))
        grown = np.full(n, P, np.uint64)
        grown[0] = 1
        with np.errstate(over="ignore"):
            _powers = np.cumprod(grown, dtype=np.uint64)   # wraps mod 2⁶⁴
    return _powers[m - 1::-1] if m else _powers[:0]


def ingest(slot, pos: int, src, h: int, start: int, checks=None) -> tuple[int, int, int]:
    """Copy ``src`` into ``slot[pos:pos + len(src)]`` (``slot`` None: no copy), continue ``h`` over
    src's whole words from byte ``start`` on and, with ``checks`` (``encoding.ElementChecks``),
    check every listed element that ends in this chunk, all in one pass: (h, first refused
    region or -1, its refused elements here). Checks need the C kernel."""
    if _foldc is not None:
        if checks is None:
            return _foldc.ingest(slot, pos, src, h, start, None, 0.0)
        return _foldc.ingest(slot, pos, src, h, start, checks.table, checks.max_scale)
    if checks is not None and len(checks.table):
        raise ValueError("element checks while copying need lifl's C kernel")
    if slot is not None:
        dst = np.frombuffer(slot, np.uint8) if not isinstance(slot, np.ndarray) else slot
        np.copyto(dst[pos:pos + len(src)], np.frombuffer(src, np.uint8))
    m = (len(src) - start) // 8
    words = np.frombuffer(src, "<u8", count=m, offset=start)
    with np.errstate(over="ignore"):
        s = int(np.sum(words * _descending_powers(m), dtype=np.uint64))
    return (h * pow(P, m, 1 << 64) + s) & MASK, -1, 0


def checks_while_copying() -> bool:
    """Whether :func:`ingest` can check elements (the C kernel is built)."""
    return _foldc is not None


class ContentHash:
    """The hash of a stream of chunks: each chunk is copied (or only read) and taken in; the words
    that straddle two chunks wait in ``pending``."""

    def __init__(self) -> None:
        self.h, self.pending = 0, b""

    def take(self, data, slot=None, pos: int = 0, checks=None) -> tuple[int, int]:
        """Take ``data``, the bytes at ``pos`` of the stream, copying them into ``slot`` at ``pos``
        when given; ``checks``: (refused region or -1, its count) as :func:`ingest` finds them."""
        n, k = len(data), 0
        if self.pending:
            k = min(8 - len(self.pending), n)
            self.pending += bytes(data[:k])
            if len(self.pending) == 8:
                self.h = (self.h * P + int.from_bytes(self.pending, "little")) & MASK
                self.pending = b""
        self.h, region, bad = ingest(slot, pos, data, self.h, k, checks)
        rest = (n - k) % 8
        if rest:
            self.pending = bytes(data[n - rest:])
        return region, bad

    def value(self) -> int:
        if not self.pending:
            return self.h
        return (self.h * P + int.from_bytes(self.pending.ljust(8, b"\0"), "little")) & MASK
