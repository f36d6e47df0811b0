"""Pluggable FedAvg aggregation for the benchmark.

* :class:`LiflAggregator` -- the real path: every client update is pushed to a
  LIFL server as soon as the client finishes (LIFL folds it eagerly) and the
  new global model is pulled when the round completes.  It reaches the
  platform only through ``lifl.client`` (and ``lifl.server`` to start an
  embedded server for the experiment, when no address is given).
* :class:`LocalFedAvg` -- a numpy float64 reference with the same semantics
  (``sum w_i x_i / sum w_i`` accumulated in float64, cast back to each
  tensor's dtype, integer tensors rounded), used by unit tests and where LIFL
  is unavailable.

Both are used through the same three calls: ``begin(global_state, expected)``,
``submit(arrays, num_examples, client_id)``, ``finish() -> new global state``.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import numpy as np

__all__ = ["Aggregator", "LocalFedAvg", "LiflAggregator", "lifl_available", "fedavg_reference", "make_aggregator"]


class Aggregator(Protocol):
    name: str

    def begin(self, global_state: dict[str, np.ndarray], expected: int) -> None: ...
    def submit(self, arrays: dict[str, np.ndarray], num_examples: int, client_id: str) -> None: ...
    def finish(self) -> dict[str, np.ndarray]: ...
    def close(self) -> None: ...


def _cast_like(acc: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        return np.rint(acc).astype(like.dtype)
    if like.dtype == np.bool_:
        return acc >= 0.5
    return acc.astype(like.dtype)


def fedavg_reference(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Plain weighted mean of a list of (arrays, num_examples); the oracle for tests."""
    if not updates:
        raise ValueError("FedAvg of zero updates")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError("FedAvg needs a positive total number of examples")
    keys = updates[0][0].keys()
    return {k: _cast_like(sum(np.asarray(a[k], np.float64) * n for a, n in updates) / total, updates[0][0][k])
            for k in keys}


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
        out = {k: _cast_like(acc / self._total, self._like[k]) for k, acc in self._acc.items()}
        self._acc = None
        return out

    def close(self) -> None:
        pass


def lifl_available() -> tuple[bool, str]:
    """Whether ``lifl.client`` (and ``lifl.server``) import; the reason if not."""
    try:
        import lifl.client  # noqa: F401
        import lifl.server  # noqa: F401
    except Exception as e:  # ImportError, or a broken build of the platform
        return False, f"{type(e).__name__}: {e}"
    return True, ""


class LiflAggregator:
    """FedAvg through a LIFL server: eager pushes, one pull per round.

    With ``address=None`` an :class:`lifl.server.EmbeddedServer` is started for
    the lifetime of this object.  ``job`` separates concurrent experiments that
    share one server.
    """

    name = "lifl"

    def __init__(self, address: str | None = None, job: str = "heteroswitch", pull_timeout_s: float = 120.0,
                 server_config: dict | None = None) -> None:
        from lifl.client import Client

        self._stack = contextlib.ExitStack()
        if address is None:
            from lifl.server import EmbeddedServer, ServerConfig

            # free ports, no /metrics listener: several experiments may run side by side
            opts = {"port": 0, "metrics_port": -1, **(server_config or {})}
            server = self._stack.enter_context(EmbeddedServer(ServerConfig(**opts)))
            address = server.address
        self.address = address
        self.job = job
        self.pull_timeout_s = pull_timeout_s
        self._client = self._stack.enter_context(Client(address))
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
        self._stack.close()

    def __enter__(self) -> "LiflAggregator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_aggregator(kind: str = "auto", address: str | None = None, job: str = "heteroswitch") -> Aggregator:
    """``"lifl"`` (error if unavailable), ``"local"``, or ``"auto"`` (LIFL when it imports)."""
    if kind == "local":
        return LocalFedAvg()
    ok, why = lifl_available()
    if kind == "lifl" and not ok:
        raise RuntimeError(f"aggregator 'lifl' requested but lifl.client cannot be imported ({why})")
    if kind not in ("lifl", "auto"):
        raise ValueError(f"aggregator must be 'lifl', 'local' or 'auto', got {kind!r}")
    return LiflAggregator(address, job=job) if ok else LocalFedAvg()
