"""What a round asks of the platform: the model's layout, who takes part, and each client's update.

Updates are a pure function of (seed, round, client), so a client process and
an independent reference produce the same arrays without shipping them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import zoo
from .config import SimConfigError, Workload
from .traces import Trace

#: The issue's 100 k-parameter scaling model: 784 -> 128 -> 10 (101,770 parameters).
MLP100K = [("fc1.weight", (128, 784), "float32"), ("fc1.bias", (128,), "float32"),
           ("fc2.weight", (10, 128), "float32"), ("fc2.bias", (10,), "float32")]


def model_specs(name: str) -> list[tuple[str, tuple, str]]:
    """(tensor, shape, dtype) of a model: a zoo name, ``mlp100k``, ``dense:N`` or an ``.npz`` path."""
    if name == "mlp100k":
        return list(MLP100K)
    if name.startswith("dense:"):
        try:
            n = int(name.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise SimConfigError(f"model {name!r}: dense:N needs N >= 1 parameters")
        return [("w", (n,), "float32")]
    if name.endswith(".npz"):
        try:
            with np.load(Path(name), allow_pickle=False) as z:
                return [(k, tuple(z[k].shape), str(z[k].dtype)) for k in z.files]
        except (OSError, ValueError) as e:
            raise SimConfigError(f"cannot read model file {name}: {e}") from None
    try:
        return zoo.specs(name)
    except KeyError:
        raise SimConfigError(f"unknown model {name!r}; use one of {', '.join(zoo.MODELS)}, mlp100k, "
                             "dense:N or a .npz file") from None


def update_bytes(specs) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in specs)


def base_model(specs, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0xba5e])
    out = {}
    for n, shape, dtype in specs:
        dt = np.dtype(dtype)
        out[n] = (rng.integers(0, 1000, size=shape).astype(dt) if dt.kind in "iu"
                  else (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)).astype(dt))
    return out


_POOL_SLACK = 4099  # distinct offsets into the shared noise (a prime: offsets spread well)
_pools: dict[tuple[int, int], np.ndarray] = {}


def _noise_pool(seed: int, numel: int) -> np.ndarray:
    """One float32 N(0, 0.01²) vector per (seed, size), drawn once per process."""
    key = (seed, numel)
    if key not in _pools:
        rng = np.random.default_rng([seed, 0x9015e])
        _pools[key] = rng.standard_normal(numel + _POOL_SLACK, dtype=np.float32) * np.float32(0.01)
    return _pools[key]


def client_update(base: dict[str, np.ndarray], seed: int, round_: int, client: int) -> dict[str, np.ndarray]:
    """A client's update: the base model plus noise, a pure function of (seed, round, client).

    The noise is a window of one shared random vector at an offset and scale that
    (round, client) pick, so 10,000 clients cost one vector add each, not 10,000
    random draws (a draw of 100 k normals costs more than pushing them).
    """
    mix = (round_ * 1_000_003 + client * 7_919 + seed * 104_729) & 0x7FFFFFFF
    numel = sum(v.size for v in base.values())
    pool = _noise_pool(seed, numel)
    off, scale = mix % _POOL_SLACK, np.float32(0.5 + (mix // _POOL_SLACK) % 1000 / 1000)
    out = {}
    for k, v in base.items():
        if v.dtype.kind == "f":
            out[k] = (v + pool[off:off + v.size].reshape(v.shape) * scale).astype(v.dtype, copy=False)
        else:
            out[k] = (v + mix % 50).astype(v.dtype)
        off += v.size
    return out


@dataclass(frozen=True)
class RoundPlan:
    """Who takes part in one round and when each upload completes."""

    round: int
    clients: np.ndarray        # population indices selected
    reports: np.ndarray        # bool: the client reports (False = dropped out)
    ready_s: np.ndarray        # seconds after the round opens at which its upload completes
    weights: np.ndarray        # num_examples (float64)
    available: int             # clients online when the round opened

    @property
    def reporting(self) -> np.ndarray:
        return self.clients[self.reports]


def examples(trace: Trace, w: Workload) -> np.ndarray:
    """Each client's weight: from the trace where given, else drawn from the workload's range."""
    rng = np.random.default_rng([w.seed, 0xe9])
    drawn = rng.integers(w.examples_min, w.examples_max + 1, len(trace)).astype(np.float64)
    return np.where(trace.num_examples > 0, trace.num_examples, drawn)


def plan_round(trace: Trace, w: Workload, round_: int, t_open: float, nbytes: int,
               weights: np.ndarray) -> RoundPlan:
    """Select up to ``clients_per_round`` of the clients online at ``t_open`` and decide dropouts."""
    rng = np.random.default_rng([w.seed, round_, 0x5e1])
    online = np.flatnonzero(trace.available(t_open))
    k = min(w.clients_per_round, len(online))
    if k == 0:
        raise SimConfigError(f"round {round_}: no client of the trace is available at t={t_open:.1f}s")
    chosen = np.sort(online if k == len(online) else rng.choice(online, k, replace=False))
    reports = rng.random(k) >= w.dropout
    if not reports.any():
        reports[0] = True  # a round with no report cannot finish; keep one
    ready = trace.ready_s(nbytes)[chosen]
    return RoundPlan(round_, chosen, reports, ready, weights[chosen], len(online))
