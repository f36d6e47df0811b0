"""Pluggable FedAvg aggregation for the benchmark.

* :class:`LiflAggregator` -- the real path: every client update is pushed to a
  running LIFL server (``lifl serve``; the caller starts it and gives its
  address) as soon as the client finishes (LIFL folds it eagerly), and the new
  global model is pulled when the round completes.  HeteroSwitch reaches the
  platform only through ``lifl.client`` (shared/DESIGN.md's wall).
* :class:`LocalFedAvg` -- an in-process float64 FedAvg with LIFL's semantics:
  ``sum w_i x_i / sum w_i`` accumulated in float64, then finalized by LIFL's
  own :func:`lifl.client.finalize_arrays` (integers rounded to nearest, ties to
  even; bools the weighted majority, ties False), so both paths agree bit for
  bit where the sums are exact.

Both are used through the same three calls: ``begin(global_state, expected)``,
``submit(arrays, num_examples, client_id)``, ``finish() -> new global state``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["Aggregator", "LocalFedAvg", "LiflAggregator", "lifl_available", "fedavg_reference", "make_aggregator"]


class Aggregator(Protocol):
    name: str

    def begin(self, global_state: dict[str, np.ndarray], expected: int) -> None: ...
    def submit(self, arrays: dict[str, np.ndarray], num_examples: int, client_id: str) -> None: ...
    def finish(self) -> dict[str, np.ndarray]: ...
    def close(self) -> None: ...


def _finalize(sums: dict[str, np.ndarray], like: dict[str, np.ndarray], total: float) -> dict[str, np.ndarray]:
    from lifl.client import finalize_arrays  # LIFL's own finalize: one semantics for both paths

    return finalize_arrays(sums, like, total)


def fedavg_reference(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Plain weighted mean of a list of (arrays, num_examples); the oracle for tests."""
    if not updates:
        raise ValueError("FedAvg of zero updates")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError("FedAvg needs a positive total number of examples")
    like = {k: np.asarray(v) for k, v in updates[0][0].items()}
    return _finalize({k: sum(np.asarray(a[k], np.float64) * n for a, n in updates) for k in like}, like, total)


class LocalFedAvg:
    """Eager in-process FedAvg (float64 accumulator)."""

    name = "local"

    def __init__(self) -> None:
        self._acc: dict[str, np.ndarray] | None = None
        self._like: dict[str, np.ndarray] = {}
        self._total = 0.0
        self._seen: set[str] = set()

    def begin(self, global_state: dict[str, np.ndarray], expected: int) -> None:
        self._like = {k: np.asarray(v) for k, v in global_state.items()}
        self._acc = {k: np.zeros(v.shape, np.float64) for k, v in self._like.items()}
        self._total, self._seen = 0.0, set()

    def submit(self, arrays: dict[str, np.ndarray], num_examples: int, client_id: str) -> None:
        if self._acc is None:
            raise RuntimeError("submit() before begin()")
        if num_examples <= 0:
            raise ValueError(f"client {client_id}: num_examples must be > 0")
        if client_id in self._seen:
            raise ValueError(f"client {client_id} already submitted this round")
        if set(arrays) != set(self._acc):
            raise KeyError(f"client {client_id}: tensor names differ from the global model")
        for k, acc in self._acc.items():
            a = np.asarray(arrays[k])
            if a.shape != acc.shape:
                raise ValueError(f"client {client_id}: {k} has shape {a.shape}, expected {acc.shape}")
            acc += a.astype(np.float64) * float(num_examples)
        self._total += float(num_examples)
        self._seen.add(client_id)

    def finish(self) -> dict[str, np.ndarray]:
        if self._acc is None or self._total == 0:
            raise RuntimeError("finish() with no updates")
        out = _finalize(self._acc, self._like, self._total)
        self._acc = None
        return out

    def close(self) -> None:
        pass


def lifl_available() -> tuple[bool, str]:
    """Whether ``lifl.client`` imports; the reason if not."""
    try:
        import lifl.client  # noqa: F401
    except Exception as e:  # ImportError, or a broken build of the platform
        return False, f"{type(e).__name__}: {e}"
    return True, ""


class LiflAggregator:
    """FedAvg through a running LIFL server at ``address``: eager pushes, one pull per round.

    ``job`` separates concurrent experiments that share one server.
    """

    name = "lifl"

    def __init__(self, address: str, job: str = "heteroswitch", pull_timeout_s: float = 120.0,
                 token: str | None = None) -> None:
        from lifl.client import Client

        if not address:
            raise ValueError("LiflAggregator needs the address (host:port) of a running LIFL server "
                             "(start one with `lifl serve`)")
        self.address = address
        self.job = job
        self.pull_timeout_s = pull_timeout_s
        self._client = Client(address, token=token)
        self._rid: int | None = None
        self._shapes: dict[str, tuple] = {}
        self.receipts: list = []

    def begin(self, global_state: dict[str, np.ndarray], expected: int) -> None:
        self._shapes = {k: np.shape(v) for k, v in global_state.items()}
        self._rid = self._client.open_round({k: np.ascontiguousarray(v) for k, v in global_state.items()},
                                            expected=expected, job=self.job)

    def submit(self, arrays: dict[str, np.ndarray], num_examples: int, client_id: str) -> None:
        if self._rid is None:
            raise RuntimeError("submit() before begin()")
        self.receipts.append(self._client.push(self._rid, {k: np.ascontiguousarray(v) for k, v in arrays.items()},
                                               num_examples=int(num_examples), client_id=client_id,
                                               job=self.job))

    def finish(self) -> dict[str, np.ndarray]:
        if self._rid is None:
            raise RuntimeError("finish() before begin()")
        out = self._client.pull(self._rid, wait_s=self.pull_timeout_s, job=self.job)
        self._rid = None
        # copy out of the pull buffer; restore each tensor's shape (0-d scalars may come back as (1,))
        return {k: np.array(v, copy=True).reshape(self._shapes.get(k, np.shape(v))) for k, v in out.items()}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "LiflAggregator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_aggregator(kind: str = "auto", address: str | None = None, job: str = "heteroswitch") -> Aggregator:
    """``"lifl"`` (the LIFL server at ``address``; an error without one or when ``lifl.client``
    cannot import), ``"local"``, or ``"auto"`` (LIFL when an address is given, else local)."""
    if kind not in ("lifl", "local", "auto"):
        raise ValueError(f"aggregator must be 'lifl', 'local' or 'auto', got {kind!r}")
    if kind == "local" or (kind == "auto" and not address):
        return LocalFedAvg()
    if not address:
        raise ValueError("aggregator 'lifl' needs the address of a running LIFL server "
                         "(e.g. --lifl-address 127.0.0.1:50051 after `lifl serve --port 50051`)")
    ok, why = lifl_available()
    if not ok:
        raise RuntimeError(f"aggregator 'lifl' requested but lifl.client cannot be imported ({why})")
    return LiflAggregator(address, job=job)
