"""Import FedScale's device traces without trusting them.

FedScale ships two Python pickles of plain dicts:

* ``client_behave_trace``: id -> {duration, active: [t...], inactive: [t...], finish_time, model}
  — client id is online from ``active[k]`` to ``inactive[k]``, and the pattern repeats
  every ``finish_time`` seconds (FedScale's ``ClientMetadata.is_active`` tests
  ``t % finish_time`` against these windows);
* ``client_device_capacity``: id -> {computation: ms per sample, communication: kbit/s}
  — FedScale's completion time is ``3 x batch_size x local_steps x computation / 1000``
  seconds of training plus ``update_kbit / communication`` seconds of upload.

A pickle can run arbitrary code when loaded, so they are read with an
unpickler that refuses every global (no class, no function, no reducer): only
the opcodes for dicts, lists, tuples, numbers, strings and bytes work.
FedScale's download time is left out (LIFL's rounds measure the upload).
"""
from __future__ import annotations

import io
import math
import pickle  # nosec B403  # only through _PlainUnpickler, which refuses every global (module docstring)
from pathlib import Path
from typing import Any

import numpy as np

from .config import SimConfigError
from .traces import Trace

_MAX_BYTES = 1 << 30


class UnsafePickle(SimConfigError):
    """The pickle asks for a global (a class, function or reducer): refused, nothing ran."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle's hook
        raise UnsafePickle(f"refusing pickle global {module}.{name}: FedScale traces are plain dicts, "
                           "and anything else could run code")

    def persistent_load(self, pid):
        raise UnsafePickle("refusing a pickle persistent id")


def plain_load(data: bytes) -> Any:
    """Unpickle built-in containers, numbers and strings only."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as e:  # a malformed pickle: name it, whatever the opcode error was
        raise SimConfigError(f"not a readable pickle: {type(e).__name__}: {e}") from None


def _read(path: str | Path) -> dict:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > _MAX_BYTES:
            raise SimConfigError(f"{p}: {size} bytes is more than a trace should be")
        data = plain_load(p.read_bytes())
    except OSError as e:
        raise SimConfigError(f"cannot read {p}: {e}") from None
    except UnsafePickle as e:
        raise UnsafePickle(f"{p}: {e}") from None
    if not isinstance(data, dict):
        raise SimConfigError(f"{p}: expected a dict of client id -> record, got {type(data).__name__}")
    if not data:
        raise SimConfigError(f"{p}: the trace names no clients")
    return data


def _float(rec: dict, key: str, where: str) -> float:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SimConfigError(f"{where}: {key} must be a finite number >= 0, got {v!r}")
    return float(v)


def load_fedscale(behave_path: str | Path, capacity_path: str | Path | None = None, batch_size: int = 30,
                  local_steps: int = 20) -> Trace:
    """A :class:`Trace` from FedScale's pickles (clients in the behaviour trace, sorted by id)."""
    behave = _read(behave_path)
    cap = _read(capacity_path) if capacity_path else {}
    keys = sorted(behave, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else str(k)))
    n = len(keys)
    compute, upload, period = np.zeros(n), np.full(n, np.inf), np.zeros(n)
    starts: list[float] = []
    ends: list[float] = []
    ptr = np.zeros(n + 1, np.int64)
    for i, k in enumerate(keys):
        rec, where = behave[k], f"{behave_path}: client {k!r}"
        if not isinstance(rec, dict):
            raise SimConfigError(f"{where}: expected a dict record, got {type(rec).__name__}")
        act, inact = rec.get("active"), rec.get("inactive")
        if not isinstance(act, list) or not isinstance(inact, list) or len(act) != len(inact):
            raise SimConfigError(f"{where}: active and inactive must be lists of equal length")
        fin = _float(rec, "finish_time", where)
        for a, b in zip(act, inact):
            a, b = _float({"t": a}, "t", where), _float({"t": b}, "t", where)
            if b < a:
                raise SimConfigError(f"{where}: a window ends ({b}) before it starts ({a})")
            starts.append(a)
            ends.append(b)
        ptr[i + 1] = len(starts)
        period[i] = fin
        c = cap.get(k)
        if c is not None:
            if not isinstance(c, dict):
                raise SimConfigError(f"{capacity_path}: client {k!r}: expected a dict record")
            where_c = f"{capacity_path}: client {k!r}"
            compute[i] = 3.0 * batch_size * local_steps * _float(c, "computation", where_c) / 1000.0
            kbps = _float(c, "communication", where_c)
            upload[i] = kbps * 1000.0 / 8.0 if kbps > 0 else np.inf
    if ptr[-1] == 0:
        raise SimConfigError(f"{behave_path}: no client has an active window")
    return Trace(tuple(str(k) for k in keys), np.zeros(n), compute, upload, np.zeros(n), np.array(starts),
                 np.array(ends), ptr, period)
