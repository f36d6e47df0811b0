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


def copy_hash(dst, src, h: int, start: int) -> int:
    """Copy ``src`` into ``dst`` (same length; None: no copy) and continue ``h`` over src's whole
    words from byte ``start`` on."""
    if _foldc is not None:
        return _foldc.copy_hash(dst, src, h, start)
    if dst is not None:
        np.copyto(np.frombuffer(dst, np.uint8) if not isinstance(dst, np.ndarray) else dst,
                  np.frombuffer(src, np.uint8))
    m = (len(src) - start) // 8
    words = np.frombuffer(src, "<u8", count=m, offset=start)
    with np.errstate(over="ignore"):
        s = int(np.sum(words * _descending_powers(m), dtype=np.uint64))
    return (h * pow(P, m, 1 << 64) + s) & MASK


class ContentHash:
    """The hash of a stream of chunks: each chunk is copied (or only read) and taken in; the words
    that straddle two chunks wait in ``pending``."""

    def __init__(self) -> None:
        self.h, self.pending = 0, b""

    def take(self, dst, data) -> None:
        n, k = len(data), 0
        if self.pending:
            k = min(8 - len(self.pending), n)
            self.pending += bytes(data[:k])
            if len(self.pending) == 8:
                self.h = (self.h * P + int.from_bytes(self.pending, "little")) & MASK
                self.pending = b""
        self.h = copy_hash(dst, data, self.h, k)
        rest = (n - k) % 8
        if rest:
            self.pending = bytes(data[n - rest:])

    def value(self) -> int:
        if not self.pending:
            return self.h
        return (self.h * P + int.from_bytes(self.pending.ljust(8, b"\0"), "little")) & MASK
