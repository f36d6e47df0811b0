"""FedBuff (Nguyen et al., AISTATS 2022): asynchronous buffered aggregation, as a pure state machine.

An asynchronous job has no round barrier. Clients pull the latest model version ``v``, train,
and push a *delta* ``Δ = x_local − x_v`` tagged with its base version ``v``. The job

* accepts an update when it has fully arrived; its **staleness** ``τ`` is the number of
  versions published between its base and its acceptance: ``τ = latest − base``;
* refuses it, changing nothing, when ``base > latest`` (a version never published:
  ``OUT_OF_RANGE``), when ``τ > max_staleness`` (``FAILED_PRECONDITION``; 0 = no limit), or
  when the same client already has an update in the open buffer (``ALREADY_EXISTS``: a retry
  is never folded twice); every message names the current version so the client can pull it;
* folds ``w·s(τ)·Δ`` into the open buffer (``w`` = the update's example count) and adds ``w``
  to the buffer's weight;
* every ``K`` accepted updates seals the buffer — later updates go to the next one at once —
  and publishes the next version::

      Δ̄ = Σ wᵢ·s(τᵢ)·Δᵢ / Σ wᵢ          x_{v+1} = server_step(x_v, Δ̄)

  ``server_step`` is a :mod:`.optimizers` step (plain ``sgd`` with ``lr`` = FedBuff's server
  learning rate ``η_g``; FedAvgM/FedAdam/FedYogi/FedAdagrad just as well). With ``s ≡ 1`` and
  all ``w = 1`` this is the paper's ``Δ̄ = (1/K)·Σ s(τᵢ)Δᵢ``; example weights make a buffer a
  FedAvg of its deltas. Staleness scales the step, it does not renormalise the weights
  (``Σ wᵢ``, not ``Σ wᵢ·s(τᵢ)``): stale updates pull the model less, as in the paper.

Staleness functions (:class:`Staleness`):

* ``constant``: ``s(τ) = 1``;
* ``polynomial``: ``s(τ) = ((1 + τ̄) / (1 + τ))^a``, ``a ∈ [0, 1]``. Normalised so that the
  *mean* staleness ``τ̄`` weighs exactly 1 — the paper's ``1/√(1+τ)`` (``a = ½``) alone would
  shrink every step of a job whose updates are typically stale, i.e. silently lower ``η_g``.
  ``τ̄`` is the job's ``mean_staleness`` if given, else the steady-state expectation
  ``(concurrency − 1) / K``: while one client trains, the other ``concurrency − 1`` each
  return about once, and every ``K`` returns publish a version;
* either with a cut-off: ``τ > cutoff`` (``cutoff > 0``) weighs the fixed ``cutoff_weight``.

Versions are published in order; :class:`BufferedJob` decides, the engine folds and publishes
(and tells it :meth:`BufferedJob.published`), so the decisions are testable without processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import LiflError, quote
from .optimizers import ServerOptimizer, new_state, step

STALENESS_KINDS = ("constant", "polynomial")


@dataclass(frozen=True)
class Staleness:
    """How much an update ``τ`` versions stale weighs (see the module docstring)."""
    kind: str = "constant"
    exponent: float = 0.5       # a, polynomial only
    mean: float = 0.0           # τ̄: the staleness that weighs 1
    cutoff: int = 0             # 0 = none; τ > cutoff weighs cutoff_weight
    cutoff_weight: float = 0.01   # used only with a cutoff

    def validate(self) -> "Staleness":
        if self.kind not in STALENESS_KINDS:
            raise LiflError("INVALID_ARGUMENT",
                            f"unknown staleness function {quote(self.kind)}; available: {', '.join(STALENESS_KINDS)}")
        if not 0.0 <= self.exponent <= 1.0:
            raise LiflError("INVALID_ARGUMENT", f"staleness exponent must be in [0, 1], got {self.exponent}")
        if not (math.isfinite(self.mean) and self.mean >= 0):
            raise LiflError("INVALID_ARGUMENT", f"mean staleness must be >= 0, got {self.mean}")
        if self.cutoff < 0:
            raise LiflError("INVALID_ARGUMENT", f"staleness cutoff must be >= 0 (0 = none), got {self.cutoff}")
        if self.cutoff and not (math.isfinite(self.cutoff_weight) and 0.0 < self.cutoff_weight <= 1.0):
            # > 0: an accepted update always counts (a zero weight would be an update folded as nothing)
            raise LiflError("INVALID_ARGUMENT", f"cutoff weight must be in (0, 1], got {self.cutoff_weight}")
        return self

    def __call__(self, tau: int) -> float:
        if self.cutoff and tau > self.cutoff:
            return self.cutoff_weight
        if self.kind == "constant":
            return 1.0
        return ((1.0 + self.mean) / (1.0 + tau)) ** self.exponent


@dataclass(frozen=True)
class AsyncSpec:
    """What an asynchronous job is opened with."""
    buffer_size: int = 10               # K: accepted updates per published version
    concurrency: int = 10               # clients meant to train at once (sets the default τ̄)
    max_staleness: int = 0              # refuse τ > this; 0 = no limit
    staleness: Staleness = field(default_factory=Staleness)
    mean_staleness: float | None = None  # τ̄; None: (concurrency − 1) / buffer_size
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)   # lr = η_g
    keep_versions: int = 4              # versions kept pullable (the latest included)

    def validate(self) -> "AsyncSpec":
        if self.buffer_size < 1:
            raise LiflError("INVALID_ARGUMENT", f"buffer size K must be >= 1, got {self.buffer_size}")
        if self.concurrency < 1:
            raise LiflError("INVALID_ARGUMENT", f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_staleness < 0:
            raise LiflError("INVALID_ARGUMENT", f"max staleness must be >= 0 (0 = no limit), got {self.max_staleness}")
        if self.keep_versions < 1:
            raise LiflError("INVALID_ARGUMENT", f"keep_versions must be >= 1, got {self.keep_versions}")
        self.staleness.validate()
        self.optimizer.validate()
        return self

    @property
    def weigh(self) -> Staleness:
        """The staleness function with its τ̄ filled in."""
        mean = self.mean_staleness if self.mean_staleness is not None else (self.concurrency - 1) / self.buffer_size
        s = Staleness(self.staleness.kind, self.staleness.exponent, float(mean),
                      self.staleness.cutoff, self.staleness.cutoff_weight)
        return s.validate()


@dataclass(frozen=True)
class Ticket:
    """An accepted update: fold ``weight·factor·Δ`` into ``buffer`` (the version it builds)."""
    client: str
    base: int
    buffer: int        # version this buffer will publish
    tau: int
    factor: float      # s(τ)
    weight: float
    position: int      # 1..K within the buffer
    seals: bool        # this update fills the buffer: publish once it is folded


@dataclass
class BufferedJob:
    """The FedBuff decisions of one asynchronous job (no arrays, no I/O)."""
    spec: AsyncSpec
    latest: int = 0                               # newest published version
    _open: int = 1                                # the buffer accepting now builds this version
    _members: set[str] = field(default_factory=set)
    _sealed: list[int] = field(default_factory=list)   # buffers full but not yet published
    refused_stale: int = 0

    def __post_init__(self) -> None:
        self.spec.validate()
        self._weigh = self.spec.weigh

    @property
    def buffer_fill(self) -> int:
        """Updates accepted into the open buffer."""
        return len(self._members)

    @property
    def open_buffer(self) -> int:
        return self._open

    def factor(self, tau: int) -> float:
        """s(τ): the weight factor an update ``tau`` versions stale gets."""
        return self._weigh(tau)

    def check(self, client: str, base: int) -> int:
        """Refuse early (at a push's header) what :meth:`accept` would refuse now; returns τ.
        Each refusal as too stale is counted once (``refused_stale``)."""
        if base > self.latest:
            raise LiflError("OUT_OF_RANGE", f"base version {base} has not been published; "
                                            f"the current version is {self.latest}: pull it and train on it")
        tau = self.latest - base
        if self.spec.max_staleness and tau > self.spec.max_staleness:
            self.refused_stale += 1
            raise LiflError("FAILED_PRECONDITION",
                            f"update on version {base} is {tau} versions stale (max {self.spec.max_staleness}); "
                            f"the current version is {self.latest}: pull it and train again")
        if client in self._members:
            raise LiflError("ALREADY_EXISTS",
                            f"client {quote(client)} already has an update in the buffer for version {self._open}; "
                            f"the current version is {self.latest}: push again after version {self._open} is published")
        return tau

    def accept(self, client: str, base: int, weight: float) -> Ticket:
        """An update fully arrived: accept it into the open buffer, or refuse it (nothing changes)."""
        tau = self.check(client, base)
        self._members.add(client)
        pos = len(self._members)
        seals = pos == self.spec.buffer_size
        ticket = Ticket(client, base, self._open, tau, self._weigh(tau), float(weight), pos, seals)
        if seals:
            self._sealed.append(self._open)
            self._open += 1
            self._members = set()
        return ticket

    def published(self, version: int) -> None:
        """The engine published ``version`` (buffers publish in order)."""
        if not self._sealed or self._sealed[0] != version:
            raise RuntimeError(f"version {version} published out of order (sealed: {self._sealed})")
        self._sealed.pop(0)
        self.latest = version

    def kept(self) -> range:
        """Versions still pullable."""
        return range(max(0, self.latest - self.spec.keep_versions + 1), self.latest + 1)


class FedBuffModel:
    """FedBuff in one process, float64: a :class:`BufferedJob` plus its buffers and versions.

    What the serverless tree computes with shared-memory accumulators, here over numpy
    arrays: for a Flower ServerApp aggregating without LIFL and as the engine's spec."""

    def __init__(self, spec: AsyncSpec, initial, state=None):
        self.job = BufferedJob(spec)
        x0 = np.array(initial, dtype=np.float64).ravel()
        self.versions: dict[int, np.ndarray] = {0: x0}
        self.opt_state = state if state is not None else new_state(spec.optimizer, x0.size)
        self._acc: dict[int, list] = {}

    @property
    def latest(self) -> int:
        return self.job.latest

    def pull(self, version: int | None = None):
        """A kept version (``None``: the latest), read-only."""
        v = self.job.latest if version is None else version
        if v not in self.versions:
            raise LiflError("NOT_FOUND", f"version {v} is not kept; kept: {list(self.job.kept())}, "
                                         f"latest {self.job.latest}")
        out = self.versions[v].view()
        out.flags.writeable = False
        return out

    def push(self, client: str, base: int, weight: float, delta) -> Ticket:
        """Accept (or refuse, changing nothing) one update; publish when it fills the buffer."""
        d = np.asarray(delta, dtype=np.float64).ravel()
        if d.size != self.versions[self.job.latest].size:
            raise LiflError("INVALID_ARGUMENT", f"delta has {d.size} elements, the model "
                                                f"{self.versions[self.job.latest].size}")
        if not (0 < weight < math.inf) or not np.isfinite(d).all():
            raise LiflError("INVALID_ARGUMENT", "weight must be positive and the delta finite")
        t = self.job.accept(client, base, weight)
        acc = self._acc.setdefault(t.buffer, [np.zeros_like(d), 0.0])
        acc[0] += (t.weight * t.factor) * d
        acc[1] += t.weight
        if t.seals:
            self._publish(t.buffer)
        return t

    def _publish(self, version: int) -> None:
        acc, w = self._acc.pop(version)
        x = self.versions[self.job.latest].copy()
        step(self.job.spec.optimizer, self.opt_state, x, acc / w)
        self.versions[version] = x
        self.job.published(version)
        kept = set(self.job.kept())
        for v in [v for v in self.versions if v not in kept]:
            del self.versions[v]
