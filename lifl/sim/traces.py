"""Client populations and their behaviour: when each client reports, how fast it is, when it is online.

A :class:`Trace` is columnar (one numpy array per field, row i = client i), so
100,000 dormant clients cost a few megabytes and no process, actor or model.

Our open trace format (docs/sim.md), one client per JSON line or CSV row:

=============  ====================================================================
``client``     id (string, required, unique)
``arrival_s``  seconds after a round opens at which the client checks in (default 0)
``compute_s``  local training seconds before it uploads (default 0)
``upload_mbps`` uplink in megabit/s; 0 or empty = unlimited (default 0)
``num_examples`` FedAvg weight; 0 or empty = drawn from the workload's range
``active``     availability windows ``[[start_s, end_s], ...]`` (CSV: ``start:end;start:end``);
               empty = always available
``period_s``   the windows repeat with this period (FedScale's ``finish_time``); 0 = never
=============  ====================================================================

A client is available at t when ``t mod period_s`` (or t) lies inside one of
its windows, ends included — FedScale's ``is_active`` without its cursor.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .config import SimConfigError, TraceSpec

COLUMNS = ("client", "arrival_s", "compute_s", "upload_mbps", "num_examples", "active", "period_s")


@dataclass(frozen=True)
class Trace:
    ids: tuple[str, ...]
    arrival_s: np.ndarray       # float64
    compute_s: np.ndarray       # float64
    upload_Bps: np.ndarray      # float64 bytes/s; inf = unlimited
    num_examples: np.ndarray    # float64; 0 = drawn from the workload
    win_start: np.ndarray       # availability windows, flattened (CSR with win_ptr)
    win_end: np.ndarray
    win_ptr: np.ndarray         # int64, len n+1
    period_s: np.ndarray        # float64; 0 = windows do not repeat

    def __post_init__(self):
        n = len(self.ids)
        if n == 0:
            raise SimConfigError("the trace names no clients")
        for name in ("arrival_s", "compute_s", "upload_Bps", "num_examples", "period_s"):
            a = getattr(self, name)
            if a.shape != (n,):
                raise SimConfigError(f"trace column {name} has {a.shape} entries for {n} clients")
            if np.isnan(a).any() or (a < 0).any():
                raise SimConfigError(f"trace column {name} must hold numbers >= 0")
        if self.win_ptr.shape != (n + 1,) or self.win_ptr[0] != 0 or self.win_ptr[-1] != len(self.win_start):
            raise SimConfigError("trace availability windows are inconsistent")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_windows(self) -> bool:
        return len(self.win_start) > 0

    def available(self, t: float) -> np.ndarray:
        """Which clients are online at time t (bool per client)."""
        n = len(self)
        if not self.has_windows:
            return np.ones(n, bool)
        counts = np.diff(self.win_ptr)
        tm = np.where(self.period_s > 0, np.mod(t, np.where(self.period_s > 0, self.period_s, 1.0)), t)
        rep = np.repeat(tm, counts)
        inside = ((self.win_start <= rep) & (rep <= self.win_end)).astype(np.int64)
        out = counts == 0  # no windows: always available
        has = np.flatnonzero(counts > 0)
        if len(has):
            out[has] = np.add.reduceat(inside, self.win_ptr[has]) > 0
        return out

    def ready_s(self, update_bytes: int) -> np.ndarray:
        """Seconds after the round opens at which each client's upload is complete."""
        return self.arrival_s + self.compute_s + update_bytes / self.upload_Bps

    def windows(self, i: int) -> list[tuple[float, float]]:
        a, b = self.win_ptr[i], self.win_ptr[i + 1]
        return [(float(s), float(e)) for s, e in zip(self.win_start[a:b], self.win_end[a:b])]


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    if median <= 0:
        return np.zeros(n)
    return median * np.exp(sigma * rng.standard_normal(n)) if sigma > 0 else np.full(n, median)


def generate(spec: TraceSpec, n: int, seed: int = 0) -> Trace:
    """A synthetic trace of ``n`` clients (kinds all_at_once, uniform, bursty, diurnal, straggler)."""
    if n < 1:
        raise SimConfigError(f"a trace needs at least one client, got {n}")
    rng = np.random.default_rng([seed, 0x7ace])
    kind = spec.kind
    if kind == "all_at_once":
        arrival = np.zeros(n)
    elif kind in ("uniform", "diurnal", "straggler"):
        arrival = rng.uniform(0.0, spec.window_s, n)
    elif kind == "bursty":
        centres = np.sort(rng.uniform(0.0, spec.window_s, spec.bursts))
        arrival = centres[rng.integers(0, spec.bursts, n)] + rng.exponential(max(spec.burst_width_s, 1e-12), n)
    else:
        raise SimConfigError(f"trace kind {kind!r} is not synthetic; load it with load_trace()")
    median, sigma = spec.compute_median_s, spec.compute_sigma
    if kind == "straggler":  # a heavy tail unless the config says otherwise
        median, sigma = median or 1.0, sigma or 1.0
    compute = _lognormal(rng, median, sigma, n)
    mbps = _lognormal(rng, spec.upload_median_mbps, spec.upload_sigma, n)
    upload = np.where(mbps > 0, mbps * 1e6 / 8, np.inf)
    if kind == "diurnal":  # each client online for active_fraction of the day, from a random phase
        p, on = spec.period_s, spec.active_fraction * spec.period_s
        start = rng.uniform(0.0, p, n)
        end = start + on
        wrap = end > p  # split a window that crosses midnight into two
        s2 = np.where(wrap, 0.0, 1.0)
        e2 = np.where(wrap, end - p, 0.0)  # (1, 0) is an empty window
        win_start = np.stack([start, s2], 1).ravel()
        win_end = np.stack([np.minimum(end, p), e2], 1).ravel()
        ptr = np.arange(0, 2 * n + 1, 2, dtype=np.int64)
        period = np.full(n, p)
    else:
        win_start = win_end = np.zeros(0)
        ptr = np.zeros(n + 1, np.int64)
        period = np.zeros(n)
    return Trace(_ids(n), arrival, compute, upload, np.zeros(n), win_start, win_end, ptr, period)


def _ids(n: int) -> tuple[str, ...]:
    return tuple(f"client-{i}" for i in range(n))


# -- our file format ------------------------------------------------------------------------------
def _num(row: dict, key: str, where: str) -> float:
    v = row.get(key)
    if v is None or v == "":
        return 0.0
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise SimConfigError(f"{where}: {key} must be a number, got {v!r}") from None
    if not math.isfinite(x) or x < 0:
        raise SimConfigError(f"{where}: {key} must be a finite number >= 0, got {v!r}")
    return x


def _windows(v, where: str) -> list[tuple[float, float]]:
    if v is None or v == "" or v == []:
        return []
    if isinstance(v, str):
        try:
            v = [tuple(float(x) for x in part.split(":")) for part in v.split(";") if part.strip()]
        except ValueError:
            raise SimConfigError(f"{where}: active must look like 'start:end;start:end', got {v!r}") from None
    out = []
    for w in v:
        if not isinstance(w, (list, tuple)) or len(w) != 2:
            raise SimConfigError(f"{where}: each active window must be [start_s, end_s], got {w!r}")
        s, e = float(w[0]), float(w[1])
        if not (0 <= s <= e and math.isfinite(e)):
            raise SimConfigError(f"{where}: an active window needs 0 <= start <= end, got {w!r}")
        out.append((s, e))
    return out


def from_rows(rows: Iterable[tuple[str, dict]]) -> Trace:
    """Build a trace from (location, row) pairs of our format; every error names its location."""
    ids, cols, wins, seen = [], {k: [] for k in ("arrival_s", "compute_s", "upload_mbps", "num_examples",
                                                  "period_s")}, [], set()
    for where, row in rows:
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise SimConfigError(f"{where}: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
        cid = row.get("client")
        if cid is None or str(cid) == "":
            raise SimConfigError(f"{where}: every row needs a client id")
        cid = str(cid)
        if cid in seen:
            raise SimConfigError(f"{where}: client {cid!r} appears twice")
        seen.add(cid)
        ids.append(cid)
        for k in cols:
            cols[k].append(_num(row, k, where))
        wins.append(_windows(row.get("active"), where))
    if not ids:
        raise SimConfigError("the trace names no clients")
    mbps = np.array(cols["upload_mbps"])
    ptr = np.zeros(len(ids) + 1, np.int64)
    ptr[1:] = np.cumsum([len(w) for w in wins])
    flat = [x for w in wins for x in w]
    return Trace(tuple(ids), np.array(cols["arrival_s"]), np.array(cols["compute_s"]),
                 np.where(mbps > 0, mbps * 1e6 / 8, np.inf), np.array(cols["num_examples"]),
                 np.array([s for s, _ in flat], float), np.array([e for _, e in flat], float), ptr,
                 np.array(cols["period_s"]))


def read_file(path: str | Path) -> Trace:
    """Read our format: ``.jsonl``/``.json`` (one object per line) or ``.csv`` (header row)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SimConfigError(f"cannot read trace {path}: {e}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None:
            raise SimConfigError(f"{path}: the trace names no clients")
        return from_rows((f"{path}:{i + 2}", row) for i, row in enumerate(reader))

    def rows():
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SimConfigError(f"{path}:{i}: not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise SimConfigError(f"{path}:{i}: each line must be a JSON object")
            yield f"{path}:{i}", obj
    return from_rows(rows())


def write_file(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` in our format (by suffix: .csv or JSON lines)."""
    path = Path(path)
    mbps = np.where(np.isinf(trace.upload_Bps), 0.0, trace.upload_Bps * 8 / 1e6)
    rows = []
    for i, cid in enumerate(trace.ids):
        rows.append({"client": cid, "arrival_s": float(trace.arrival_s[i]), "compute_s": float(trace.compute_s[i]),
                     "upload_mbps": float(mbps[i]), "num_examples": float(trace.num_examples[i]),
                     "active": [list(w) for w in trace.windows(i)], "period_s": float(trace.period_s[i])})
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as f:
            wr = csv.DictWriter(f, COLUMNS)
            wr.writeheader()
            for r in rows:
                wr.writerow({**r, "active": ";".join(f"{s!r}:{e!r}" for s, e in r["active"])})
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def resize(trace: Trace, n: int) -> Trace:
    """The first ``n`` clients of a trace (a population smaller than the file)."""
    if n > len(trace):
        raise SimConfigError(f"the trace has {len(trace)} clients but the workload needs {n}")
    if n == len(trace):
        return trace
    end = int(trace.win_ptr[n])
    return Trace(trace.ids[:n], trace.arrival_s[:n], trace.compute_s[:n], trace.upload_Bps[:n],
                 trace.num_examples[:n], trace.win_start[:end], trace.win_end[:end], trace.win_ptr[:n + 1],
                 trace.period_s[:n])


def build(spec: TraceSpec, n: int, seed: int = 0) -> Trace:
    """The population a run simulates: generated, read from our format, or imported from FedScale."""
    if spec.kind == "file":
        return resize(read_file(spec.path), n)
    if spec.kind == "fedscale":
        from .fedscale import load_fedscale
        return resize(load_fedscale(spec.path, spec.capacity_path or None, spec.fedscale_batch_size,
                                    spec.fedscale_local_steps), n)
    return generate(spec, n, seed)

