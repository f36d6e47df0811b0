"""A model as one flat buffer plus an index: the unit every LIFL stage handles.

Tensors are stored in spec order, C-contiguous, little-endian, each starting at
an offset aligned up to :data:`ALIGN` bytes. The same layout is used on the
wire, in shared-memory slots and for the published global model, so a gRPC
chunk is one ``memcpy`` and a fold is one vectorised pass per tensor.

``bfloat16`` comes from ``ml_dtypes`` (numpy has none); kernels read it as raw
16-bit words.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from .errors import quote

ALIGN = 64
MAX_NAME_CHARS = 512       # a tensor name longer than this is refused (no real model has one)
MAX_NDIM = 32              # numpy's own limit is 64; no layer has more than a handful
MAX_TOTAL_BYTES = 1 << 50  # a layout larger than 1 PiB is nonsense, whatever a server allows

#: Supported dtype names -> (numpy storage dtype, fold kernel id, is_float).
_DTYPES: dict[str, tuple[np.dtype, int, bool]] = {
    "float32": (np.dtype("<f4"), 0, True),
    "float64": (np.dtype("<f8"), 1, True),
    "float16": (np.dtype("<f2"), 2, True),
    "bfloat16": (np.dtype("<u2"), 3, True),
    "int64": (np.dtype("<i8"), 4, False),
    "int32": (np.dtype("<i4"), 5, False),
    "int16": (np.dtype("<i2"), 6, False),
    "int8": (np.dtype("i1"), 7, False),
    "uint8": (np.dtype("u1"), 8, False),
    "bool": (np.dtype("?"), 9, False),
}
SUPPORTED_DTYPES = tuple(_DTYPES)

import ml_dtypes as _ml_dtypes

_BF16 = np.dtype(_ml_dtypes.bfloat16)


class LayoutError(ValueError):
    """A tensor spec or buffer that does not fit a layout."""


def align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def dtype_name(dtype: np.dtype) -> str:
    """Name of a numpy dtype in LIFL's vocabulary (raises LayoutError if unsupported)."""
    dtype = np.dtype(dtype)
    if dtype == _BF16:
        return "bfloat16"
    name = dtype.newbyteorder("=").name if dtype.byteorder not in "=|" else dtype.name
    if name not in _DTYPES or name == "bfloat16":
        raise LayoutError(f"dtype {dtype} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return name


def storage_dtype(name: str) -> np.dtype:
    return _DTYPES[name][0]


def public_dtype(name: str) -> np.dtype:
    """The dtype users see for ``name`` (bfloat16 when available)."""
    if name == "bfloat16":
        return _BF16
    return _DTYPES[name][0]


def kernel_id(name: str) -> int:
    return _DTYPES[name][1]


def is_float(name: str) -> bool:
    return _DTYPES[name][2]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def check(self) -> None:
        """Refuse a spec no model has. Messages quote client strings bounded (``errors.quote``)."""
        if not self.name:
            raise LayoutError("a tensor has an empty name")
        if len(self.name) > MAX_NAME_CHARS:
            raise LayoutError(f"tensor name {quote(self.name)} is longer than {MAX_NAME_CHARS} characters")
        if self.dtype not in _DTYPES:
            raise LayoutError(f"tensor {quote(self.name)}: dtype {quote(self.dtype, 32)} is not supported; "
                              f"use one of {', '.join(SUPPORTED_DTYPES)}")
        if len(self.shape) > MAX_NDIM:
            raise LayoutError(f"tensor {quote(self.name)} has {len(self.shape)} dimensions; at most {MAX_NDIM}")
        if any(d < 0 for d in self.shape):
            raise LayoutError(f"tensor {quote(self.name)}: negative dimension in shape {quote(list(self.shape))}")
        if self.nbytes > MAX_TOTAL_BYTES:
            raise LayoutError(f"tensor {quote(self.name)} of shape {quote(list(self.shape))} is larger than "
                              f"{MAX_TOTAL_BYTES} bytes")


@dataclass(frozen=True)
class Layout:
    """Ordered tensor specs with byte offsets (native buffer) and element offsets (float64 accumulator)."""

    specs: tuple[TensorSpec, ...]
    offsets: tuple[int, ...]
    elem_offsets: tuple[int, ...]
    total_size: int
    numel: int

    @classmethod
    def from_specs(cls, specs) -> "Layout":
        specs = tuple(specs)
        seen: set[str] = set()
        offsets, elem_offsets = [], []
        pos = elems = 0
        for s in specs:
            s.check()
            if s.name in seen:
                raise LayoutError(f"tensor name {quote(s.name)} appears twice")
            seen.add(s.name)
            pos = align(pos)
            offsets.append(pos)
            elem_offsets.append(elems)
            pos += s.nbytes
            elems += s.numel
            if pos > MAX_TOTAL_BYTES:
                raise LayoutError(f"the model is larger than {MAX_TOTAL_BYTES} bytes")
        if not specs:
            raise LayoutError("a model needs at least one tensor")
        return cls(specs, tuple(offsets), tuple(elem_offsets), pos, elems)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "Layout":
        return cls.from_specs(
            TensorSpec(str(k), dtype_name(np.asarray(v).dtype), tuple(int(d) for d in np.shape(v)))
            for k, v in arrays.items())

    # -- JSON (between the engine, functions, node gateways and client processes) -----------
    def to_wire(self) -> list:
        """The one JSON form of a layout: ``[[name, dtype, [dims...]], ...]``."""
        return [[s.name, s.dtype, list(s.shape)] for s in self.specs]

    @classmethod
    def from_wire(cls, specs) -> "Layout":
        return cls.from_specs(TensorSpec(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in specs)

    # -- protobuf -----------------------------------------------------------
    @classmethod
    def from_proto(cls, tensors) -> "Layout":
        return cls.from_specs(TensorSpec(t.name, t.dtype, tuple(int(d) for d in t.shape)) for t in tensors)

    def to_proto(self, into) -> None:
        """Append this layout's specs to a repeated TensorSpec proto field."""
        for s in self.specs:
            t = into.add()
            t.name, t.dtype = s.name, s.dtype
            t.shape.extend(s.shape)

    # -- buffers ------------------------------------------------------------
    def views(self, buf, public: bool = True) -> dict[str, np.ndarray]:
        """Zero-copy numpy views of each tensor inside ``buf`` (native layout)."""
        out = {}
        for s, off in zip(self.specs, self.offsets):
            dt = public_dtype(s.dtype) if public else storage_dtype(s.dtype)
            out[s.name] = np.frombuffer(buf, dtype=dt, count=s.numel, offset=off).reshape(s.shape)
        return out

    def pack_into(self, arrays: Mapping[str, np.ndarray], buf) -> None:
        """Copy ``arrays`` (checked against the specs) into ``buf``."""
        self.check_arrays(arrays)
        dst = np.frombuffer(buf, dtype=np.uint8, count=self.total_size)
        for s, off in zip(self.specs, self.offsets):
            a = np.ascontiguousarray(arrays[s.name])
            dst[off:off + s.nbytes] = _raw_bytes(a, s)

    def check_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        names = [s.name for s in self.specs]
        if list(arrays.keys()) != names and set(arrays.keys()) != set(names):
            missing = sorted(set(names) - set(arrays))
            extra = sorted(set(arrays) - set(names))
            raise LayoutError(f"tensor names differ from the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for s in self.specs:
            a = np.asarray(arrays[s.name])
            if tuple(a.shape) != s.shape:
                raise LayoutError(f"tensor {s.name!r}: shape {list(a.shape)} != model's {list(s.shape)}")
            if dtype_name(a.dtype) != s.dtype:
                raise LayoutError(f"tensor {s.name!r}: dtype {dtype_name(a.dtype)} != model's {s.dtype}")

    def chunks(self, arrays: Mapping[str, np.ndarray], chunk_size: int) -> Iterator[memoryview]:
        """Yield the flat layout of ``arrays`` in pieces of exactly ``chunk_size`` (last may be shorter).

        Avoids materialising the whole model: a piece is a view into a tensor when
        it lies inside one, else it is assembled in a reusable chunk-sized buffer.
        """
        self.check_arrays(arrays)
        raws = [_raw_bytes(np.ascontiguousarray(arrays[s.name]), s) for s in self.specs]
        scratch = bytearray(chunk_size)
        pos = 0
        while pos < self.total_size:
            end = min(pos + chunk_size, self.total_size)
            i = self._tensor_at(pos)
            s_off, s_len = self.offsets[i], self.specs[i].nbytes
            if s_off <= pos and end <= s_off + s_len:
                yield memoryview(raws[i])[pos - s_off:end - s_off]
            else:
                piece = memoryview(scratch)[:end - pos]
                self._gather(raws, pos, end, piece)
                yield piece
                scratch = bytearray(chunk_size)  # the caller may still hold the previous piece
            pos = end

    def _tensor_at(self, pos: int) -> int:
        return max(0, bisect.bisect_right(self.offsets, pos) - 1)

    def _gather(self, raws, start: int, end: int, out: memoryview) -> None:
        out[:] = b"\0" * len(out)
        for i in range(self._tensor_at(start), len(self.specs)):
            off = self.offsets[i]
            if off >= end:
                break
            a, b = max(start, off), min(end, off + self.specs[i].nbytes)
            if a < b:
                out[a - start:b - start] = memoryview(raws[i])[a - off:b - off]

    def describe(self) -> str:
        mib = self.total_size / 2**20
        return f"{len(self.specs)} tensors, {self.numel:,} elements, {mib:.1f} MiB"


def _raw_bytes(a: np.ndarray, spec: TensorSpec) -> memoryview:
    """The little-endian bytes of a C-contiguous array, as a flat memoryview (no copy if already LE)."""
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a.reshape(-1).view(np.uint8))


def to_torch(arrays: Mapping[str, np.ndarray]):
    """Zero-copy torch tensors over numpy arrays (bfloat16 reinterpreted)."""
    import torch

    out = {}
    for k, v in arrays.items():
        if v.dtype == _BF16:
            out[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(np.asarray(v))
    return out


def from_torch(tensors) -> dict[str, np.ndarray]:
    """numpy views of CPU torch tensors (state_dict order kept; bfloat16 via raw words)."""
    import torch

    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().view(np.uint16)
            out[k] = raw.view(_BF16)
        else:
            out[k] = t.numpy()
    return out
