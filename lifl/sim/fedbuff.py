"""Time to accuracy under a straggler trace: FedBuff against synchronous FedAvg, on the harness's clock.

Both methods train the same task (``run.task``, default :mod:`.training`) with the same local
training (learning rate, epochs) on the same population, and each client's work takes the same
virtual time in both: from receiving the model to its update arriving at the server,
``trace.ready_s(update bytes)`` seconds (the trace's check-in delay + its lognormal compute time +
upload). A client's speed is its own and stays with it (a slow phone stays slow).

* **Synchronous FedAvg** (:func:`run_sync`): each round samples ``ceil(C·(1 + over_selection))``
  clients uniformly from the population, waits for the first ``C`` updates (``over_selection = 0``:
  for every one of them, i.e. its slowest client) and takes the server step
  ``x ← x + η·(Σ wᵢ xᵢ / Σ wᵢ − x)`` (``η = 1`` is FedAvg). The others' work is discarded.
* **FedBuff** (:func:`run_fedbuff`): ``C`` clients train at once. A client pulls ``latest``
  (version ``v``), trains, and pushes ``Δ = x_local − x_v`` tagged with ``v``; the moment its
  slot frees, a new client (uniform over those idle and not already in the open buffer) pulls the
  newest version and starts. The aggregation is the server's own: every ``K`` accepted updates a
  version ``Σ wᵢ s(τᵢ) Δᵢ / Σ wᵢ`` server step later (``lifl.engine.buffered``, docs/async.md).

The aggregation runs in one of two places (:class:`Aggregator`): :class:`ModelledFedBuff`, the
engine's float64 specification of FedBuff in this process (virtual mode), or :class:`LiflFedBuff`,
a real LIFL server's asynchronous job over gRPC (real mode: the versions clients train on are
the ones the server published). Virtual time is driven by the trace alone — when a push seals a
buffer the driver waits for that version before the clock moves on — so both give the same
sequence of events and, up to the server's float32 copy of each buffer's mean, the same models.
Server time (milliseconds) is not added to the clock: against client tasks of seconds it is
noise, and leaving it out of both methods keeps the comparison about the round barrier.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from ..engine.buffered import AsyncSpec, FedBuffModel, Staleness
from ..engine.optimizers import ServerOptimizer
from ..errors import LiflError

Model = dict[str, np.ndarray]


@dataclass(frozen=True)
class Population:
    """Who can train, how long each one's task takes, and how much it weighs."""
    duration_s: np.ndarray      # per client: model received -> update at the server (virtual seconds)
    weights: np.ndarray         # per client: examples (FedAvg weight, and how much data it trains on)

    def __post_init__(self):
        if self.duration_s.shape != self.weights.shape or self.duration_s.ndim != 1 or not len(self.weights):
            raise ValueError("durations and weights must be two equal, non-empty vectors")
        if not (np.isfinite(self.duration_s).all() and (self.duration_s >= 0).all() and (self.weights > 0).all()):
            raise ValueError("durations must be finite and >= 0, weights > 0")

    def __len__(self) -> int:
        return len(self.weights)


@dataclass(frozen=True)
class Local:
    """What every client does with the model it gets (both methods alike)."""
    task: object                # a task module: SPECS, initial_model, local_train, accuracy (docs/sim.md)
    seed: int = 0
    lr: float = 0.05
    epochs: int = 1

    def train(self, model: Model, client: int, weight: float) -> Model:
        return self.task.local_train(model, self.seed, int(client), int(weight), lr=self.lr, epochs=self.epochs)

    def accuracy(self, model: Model) -> float:
        return float(self.task.accuracy(model, self.seed))


@dataclass
class Point:
    """The model after a server step: when it was published, what it scores."""
    t: float                    # virtual seconds since the start
    step: int                   # round (sync) or version (FedBuff)
    updates: int                # client updates folded into the model so far
    accuracy: float


@dataclass
class Event:
    """One accepted FedBuff update, as the driver pushed it (for an independent replay)."""
    t: float                    # when it arrived (its start + its task time)
    started: float              # when the client pulled its base version
    client: int
    base: int                   # version it trained on
    weight: float
    version: int                # the version its buffer builds
    staleness: int


@dataclass
class Curve:
    method: str
    points: list[Point] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)     # FedBuff only
    refused: dict = field(default_factory=dict)
    final: Model | None = None

    def time_to(self, target: float) -> float | None:
        """Virtual seconds until the model first reaches ``target`` accuracy (None: never)."""
        return next((p.t for p in self.points if p.accuracy >= target), None)

    def final_accuracy(self, last: int = 1) -> float:
        """Accuracy of the last model, or the mean over the last ``last`` evaluations."""
        return float(np.mean([p.accuracy for p in self.points[-last:]]))


# --- synchronous FedAvg -----------------------------------------------------------------------

def run_sync(pop: Population, local: Local, *, concurrency: int, horizon_s: float, server_lr: float = 1.0,
             over_selection: float = 0.0, seed: int = 0) -> Curve:
    """Synchronous FedAvg rounds until ``horizon_s`` of virtual time (module docstring)."""
    if not 1 <= concurrency <= len(pop):
        raise ValueError(f"concurrency must be in [1, {len(pop)}], got {concurrency}")
    pick = min(len(pop), math.ceil(concurrency * (1.0 + over_selection)))
    rng = np.random.default_rng([seed, 0x5c])
    model = local.task.initial_model(local.seed)
    curve = Curve("sync" if not over_selection else f"sync+{over_selection:g}")
    curve.points.append(Point(0.0, 0, 0, local.accuracy(model)))
    t, updates, rnd = 0.0, 0, 0
    while True:
        chosen = rng.choice(len(pop), pick, replace=False)
        order = np.argsort(pop.duration_s[chosen], kind="stable")[:concurrency]
        took = chosen[order]
        t += float(pop.duration_s[took].max())
        if t > horizon_s:
            break
        rnd += 1
        total = float(pop.weights[took].sum())
        mean = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
        for c in took:
            up = local.train(model, c, pop.weights[c])
            for k in mean:
                mean[k] += pop.weights[c] * up[k].astype(np.float64)
        model = {k: (v + server_lr * (mean[k] / total - v.astype(np.float64))).astype(v.dtype)
                 for k, v in model.items()}
        updates += concurrency
        curve.points.append(Point(t, rnd, updates, local.accuracy(model)))
    curve.refused = {"discarded (over-selection)": (pick - concurrency) * rnd}
    curve.final = model
    return curve


# --- FedBuff -----------------------------------------------------------------------------------

class Aggregator(Protocol):
    """Where FedBuff's buffers are folded and versions published."""

    def latest(self) -> tuple[int, Model]: ...

    def push(self, client: int, base: int, weight: float, delta: Model) -> tuple[int, int]:
        """Accept an update (or raise :class:`LiflError`); returns (version its buffer builds, τ)."""

    def version(self, v: int) -> Model:
        """Version ``v``, waiting for it to be published if it is being finalized."""


class ModelledFedBuff:
    """The engine's float64 specification of FedBuff (:class:`lifl.engine.buffered.FedBuffModel`)."""

    def __init__(self, spec: AsyncSpec, x0: Model):
        self._names = list(x0)
        self._shapes = {k: (v.shape, v.dtype) for k, v in x0.items()}
        self.m = FedBuffModel(spec, np.concatenate([np.asarray(x0[k], np.float64).ravel() for k in self._names]))

    def _arrays(self, flat: np.ndarray) -> Model:
        out, pos = {}, 0
        for k in self._names:
            shape, dt = self._shapes[k]
            n = int(np.prod(shape))
            out[k] = flat[pos:pos + n].reshape(shape).astype(dt)   # as the server serves it: the model's dtype
            pos += n
        return out

    def latest(self) -> tuple[int, Model]:
        return self.m.latest, self._arrays(self.m.pull())

    def push(self, client: int, base: int, weight: float, delta: Model) -> tuple[int, int]:
        t = self.m.push(f"client-{client}", base, weight,
                        np.concatenate([np.asarray(delta[k], np.float64).ravel() for k in self._names]))
        return t.buffer, t.tau

    def version(self, v: int) -> Model:
        return self._arrays(self.m.pull(v))


class LiflFedBuff:
    """A real LIFL server's asynchronous job, through the public client (:class:`lifl.client.Client`)."""

    def __init__(self, client, spec: AsyncSpec, x0: Model, job: str = "sim-fedbuff", wait_s: float = 60.0):
        self.c, self.job, self.wait_s = client, job, wait_s
        client.open_async(x0, spec, job=job)

    def latest(self) -> tuple[int, Model]:
        return self.c.pull_version("latest", job=self.job)

    def push(self, client: int, base: int, weight: float, delta: Model) -> tuple[int, int]:
        from ..client import RpcFailure
        try:
            r = self.c.push(0, delta, num_examples=weight, client_id=f"client-{client}", job=self.job,
                            base_version=base)
        except RpcFailure as e:   # the same refusal the modelled server raises
            raise LiflError(e.code.name, e.message) from None
        return r.version, r.staleness

    def version(self, v: int) -> Model:
        return self.c.pull_version(v, job=self.job, wait_s=self.wait_s)[1]

    def close(self) -> None:
        self.c.close_job(self.job)


def fedbuff_spec(concurrency: int, buffer_size: int, server_lr: float, staleness: str = "polynomial",
                 exponent: float = 0.5, max_staleness: int = 0, keep_versions: int = 4) -> AsyncSpec:
    """The job both aggregators are opened with. The driver keeps the model each client trains on,
    so the server needs to keep only the newest versions (a push names its base by number)."""
    return AsyncSpec(buffer_size=buffer_size, concurrency=concurrency, max_staleness=max_staleness,
                     staleness=Staleness(staleness, exponent), optimizer=ServerOptimizer.of("sgd", lr=server_lr),
                     keep_versions=keep_versions).validate()


def run_fedbuff(pop: Population, local: Local, agg: Aggregator, *, concurrency: int, buffer_size: int,
                horizon_s: float, seed: int = 0, on_point: Callable[[Point], None] | None = None) -> Curve:
    """FedBuff with ``concurrency`` clients in flight until ``horizon_s`` of virtual time (module docstring)."""
    if not 1 <= concurrency <= len(pop) - buffer_size:
        raise ValueError(f"concurrency must be in [1, population − K = {len(pop) - buffer_size}], got {concurrency}")
    rng = np.random.default_rng([seed, 0xfb])
    curve = Curve("fedbuff")
    v0, x0 = agg.latest()
    curve.points.append(Point(0.0, v0, 0, local.accuracy(x0)))
    busy: set[int] = set()          # training now
    in_buffer: set[int] = set()     # pushed into the open buffer (a second push would be ALREADY_EXISTS)
    models: dict[int, Model] = {v0: x0}
    uses: dict[int, int] = {}       # clients training on each version (so old versions can be dropped)
    flight: list = []               # heap of (arrival time, order, client, base)
    order = 0

    def start(t: float, v: int) -> None:
        """A new client (uniform over the idle ones not already in the open buffer) pulls version ``v``."""
        nonlocal order
        while True:
            c = int(rng.integers(len(pop)))
            if c not in busy and c not in in_buffer:
                break
        busy.add(c)
        uses[v] = uses.get(v, 0) + 1
        heapq.heappush(flight, (t + float(pop.duration_s[c]), order, c, v, t))
        order += 1

    latest = (v0, x0)
    for _ in range(concurrency):
        start(0.0, v0)
    accepted = 0
    while flight:
        t, _, c, base, started = heapq.heappop(flight)
        if t > horizon_s:
            break
        busy.discard(c)
        xb = models[base]
        uses[base] -= 1
        trained = local.train(xb, c, pop.weights[c])
        delta = {k: (trained[k].astype(np.float64) - xb[k]).astype(xb[k].dtype) for k in xb}
        try:
            builds, tau = agg.push(c, base, float(pop.weights[c]), delta)
        except LiflError as e:   # too stale (max_staleness): the work is lost, the client goes back idle
            if e.code != "FAILED_PRECONDITION":
                raise        # anything else is a bug in the driver or the server: loud
            curve.refused[e.code] = curve.refused.get(e.code, 0) + 1
        else:
            accepted += 1
            in_buffer.add(c)
            curve.events.append(Event(t, started, c, base, float(pop.weights[c]), builds, tau))
            if len(in_buffer) == buffer_size:    # sealed: wait for the version before the clock moves on
                in_buffer.clear()
                latest = (builds, agg.version(builds))
                models[builds] = latest[1]
                p = Point(t, builds, accepted, local.accuracy(latest[1]))
                curve.points.append(p)
                if on_point:
                    on_point(p)
        for v in [v for v, n in uses.items() if n == 0 and v != latest[0]]:
            del uses[v], models[v]
        start(t, latest[0])
    curve.final = latest[1]
    return curve


def population(trace, weights: np.ndarray, update_bytes: int) -> Population:
    """A :class:`Population` from a harness trace (:mod:`.traces`) and the workload's weights."""
    return Population(np.asarray(trace.ready_s(update_bytes), np.float64), np.asarray(weights, np.float64))
