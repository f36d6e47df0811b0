"""Asynchronous (FedBuff) jobs on the serverless tree: buffers as rounds, versions in shared memory.

Each buffer of an asynchronous job is one round of the eager tree with ``expected = K``: an
accepted delta is folded at once with the fold weight ``w·s(τ)``, and when the buffer's K-th
update is accepted the next buffer's round opens at once (the next buffer folds while this one
finalizes). The **top function** of a buffer's round takes the server step as part of its
finalize (``lifl.serverstep``, delta mode): ``Δ̄ = Σ w s Δ / Σ w`` (the job hands it ``Σ w``),
``x_v = x_{v−1} + step(Δ̄)`` in float64 from the job's float64 master copy, writing the next
master copy and the version in the model's dtypes in the same pass. Master copies and optimizer
state are double buffered in shared memory (a re-run step reads untouched inputs), and a
buffer's finalize waits for the one before it (the engine orders them: ``step["after"]``).
A publisher thread per job only takes each buffer's result, in order, and publishes it as the
next version — the gateway process does no model-sized math. The last ``keep_versions``
versions stay pullable; a reader holds its segment (``Arena.share``) so eviction never cuts a
stream.

On the Ray runtime a top function on another node cannot map the head's segments: the runtime
hands it the state and master copy through the object store and writes back what it wrote
(``lifl.runtime.ray``), so the step is the same code in the same place on every runtime.

Tensors: floating point and signed integer ones (integers ride in the float64 master copy and
are published rounded to nearest and clipped, as a synchronous round's mean is); updates may be
pushed in any encoding the server takes (``lifl.encoding``): the tree folds them dequantised.

The decisions (staleness, refusals, K) are :class:`lifl.engine.buffered.BufferedJob`'s; this
module only binds them to the dispatcher's public round API and the arena.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .engine.buffered import AsyncSpec, BufferedJob, Ticket
from .errors import LiflError, quote
from .fold import as_f64 as to_f64
from .layout import Layout, is_float
from .serverstep import state_dtype, state_nbytes
from .shm import Segment

log = logging.getLogger("lifl.async")


def _unsupported(layout: Layout) -> str | None:
    """A tensor whose delta cannot be pushed: bool and unsigned tensors have no negative values."""
    for s in layout.specs:
        if not is_float(s.dtype) and (s.dtype == "bool" or s.dtype.startswith("uint")):
            return s.name
    return None


def needs_base_version(aj: "AsyncJob") -> LiflError:
    """A push by round (no base version) to an asynchronous job: refused alike at every gateway."""
    return LiflError("INVALID_ARGUMENT", f"job {quote(aj.name)} is asynchronous: set base_version to the "
                                         f"version the delta was trained on (current: {aj.job.latest})")


@dataclass
class AsyncJob:
    name: str
    spec: AsyncSpec
    layout: Layout
    job: BufferedJob
    x_segs: tuple[Segment, Segment]        # float64 master copies: version v's is x_segs[v % 2]
    opt_seg: Segment                       # optimizer state, double buffered (lifl.serverstep)
    versions: dict[int, Segment] = field(default_factory=dict)
    rounds: dict[int, int] = field(default_factory=dict)        # buffer -> round id of the tree
    weights: dict[int, float] = field(default_factory=dict)        # buffer -> Σw
    steps: dict[int, dict] = field(default_factory=dict)           # buffer -> its round's server step
    accepted: int = 0
    total_weight: float = 0.0
    failed: str = ""
    closed: threading.Event = field(default_factory=threading.Event)
    on_stop: list = field(default_factory=list)   # callbacks of waits to end when the job stops
    opened: float = field(default_factory=time.time)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.layout.specs)


class AsyncJobs:
    """The server's asynchronous jobs (created by the gateway, closed by the server)."""

    def __init__(self, arena, dispatcher, metrics):
        self.arena, self.dispatcher, self.metrics = arena, dispatcher, metrics
        self._jobs: dict[str, AsyncJob] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def get(self, name: str) -> AsyncJob | None:
        with self._lock:
            return self._jobs.get(name)

    def all(self) -> list[AsyncJob]:
        with self._lock:
            return list(self._jobs.values())

    # -- opening ------------------------------------------------------------------------------
    def open(self, name: str, layout: Layout, initial: Segment, spec: AsyncSpec) -> AsyncJob:
        """Take ``initial`` (version 0; owned from now on) and start the first buffer."""
        bad = _unsupported(layout)
        if bad is not None:
            raise LiflError("INVALID_ARGUMENT", f"asynchronous jobs fold deltas of float and signed integer "
                                                f"tensors; tensor {quote(bad)} is bool or unsigned (its delta "
                                                "cannot be negative)")
        with self._lock:
            if name in self._jobs:
                raise LiflError("ALREADY_EXISTS", f"asynchronous job {quote(name)} is already open "
                                                  f"(version {self._jobs[name].job.latest})")
            n = layout.numel
            made = []
            try:
                for size in (8 * n, 8 * n, state_nbytes(spec.optimizer, layout)):
                    made.append(self.arena.segment(size))
                aj = AsyncJob(name, spec, layout, BufferedJob(spec), (made[0], made[1]), made[2],
                              versions={0: initial})
                to_f64(layout, initial.buf, made[0].array(np.float64, n))
                made[2].array(np.uint8)[:8] = 0        # step counter 0; the moments start at 0 below
                made[2].array(np.uint8)[8:] = 0
                self._open_buffer(aj)
            except BaseException:
                for seg in made:
                    self.arena.free(seg.name)
                raise
            self._jobs[name] = aj
        t = threading.Thread(target=self._publisher, args=(aj,), name=f"lifl-fedbuff-{name[:16]}", daemon=True)
        self._threads.append(t)
        t.start()
        log.info("asynchronous job %s opened: K=%d, concurrency %d, max staleness %d, staleness %s, optimizer %s",
                 quote(name), spec.buffer_size, spec.concurrency, spec.max_staleness, spec.staleness.kind,
                 spec.optimizer.kind)
        return aj

    def _open_buffer(self, aj: AsyncJob) -> None:
        """The open buffer's round; its top function's finalize takes the step, reading the
        previous version's master copy and step ``b − 1``'s state, so it waits for the round of
        buffer ``b − 1`` (``after``)."""
        k, b = aj.spec.buffer_size, aj.job.open_buffer
        step = {"opt": dataclasses.asdict(aj.spec.optimizer), "state": aj.opt_seg.name,
                "moments": state_dtype(aj.layout), "t": b - 1, "w": 0.0,
                "x_in": aj.x_segs[(b - 1) % 2].name, "x_out": aj.x_segs[b % 2].name,
                "after": aj.rounds.get(b - 1, 0)}
        rnd = self.dispatcher.open_round(aj.name, aj.layout, k, k, 0.0, None, step=step)
        aj.rounds[b] = rnd.id
        aj.weights[b] = 0.0
        aj.steps[b] = step

    # -- pushes -------------------------------------------------------------------------------
    def check(self, aj: AsyncJob, client: str, base: int) -> None:
        """Refuse early, at the header, what acceptance would refuse now (no bytes sent in vain)."""
        with aj.cond:
            self._check_alive(aj)
            try:
                aj.job.check(client, base)
            except LiflError as e:
                self._count_refusal(aj, e)
                raise

    def accept(self, aj: AsyncJob, client: str, base: int, weight: float, slot: str, node: str = "") -> Ticket:
        """The update in ``slot`` (on ``node``: a node gateway's; default the head's) fully arrived:
        fold it into the open buffer with ``w·s(τ)``."""
        with aj.cond:
            self._check_alive(aj)
            try:
                tau = aj.job.check(client, base)
            except LiflError as e:
                self._count_refusal(aj, e)
                raise
            b = aj.job.open_buffer
            rid = aj.rounds[b]
            factor = aj.job.factor(tau)
            run = self.dispatcher.begin_push(aj.name, rid, client)
            step = aj.steps[b]
            step["w"] = aj.weights[b] + weight    # Σw as the finalize will read it once this update seals the buffer
            try:
                self.dispatcher.accept(run, client, slot, weight * factor, node=node)
            except BaseException:
                step["w"] = aj.weights[b]
                self.dispatcher.abandon(run, client)
                raise
            ticket = aj.job.accept(client, base, weight)    # the same decision: same state, same lock
            aj.weights[b] += weight
            aj.accepted += 1
            aj.total_weight += weight
            self.metrics.staleness.labels(aj.name).observe(tau)
            self.metrics.buffer_fill.labels(aj.name).set(aj.job.buffer_fill)
            if ticket.seals:
                self._open_buffer(aj)
                aj.cond.notify_all()
            return ticket

    def _count_refusal(self, aj: AsyncJob, e: LiflError) -> None:
        if e.code == "FAILED_PRECONDITION":
            self.metrics.refused_stale.labels(aj.name).inc()

    def close_job(self, name: str) -> AsyncJob:
        """An operator closes the job: no more pushes, the open buffer is discarded, its
        publisher stops and its shared memory is given back; the name may be opened again."""
        with self._lock:
            aj = self._jobs.pop(name, None)
        if aj is None:
            raise LiflError("NOT_FOUND", f"no asynchronous job {quote(name)} is open")
        with aj.cond:
            aj.closed.set()
            aj.cond.notify_all()
            rids = list(aj.rounds.values())
        self._stopped(aj)
        for rid in rids:
            try:
                self.dispatcher.close_round(aj.name, rid, abort=True)
            except LiflError:       # already finished
                pass
        for t in [t for t in self._threads if t.name == f"lifl-fedbuff-{name[:16]}"]:
            t.join(timeout=5.0)
        with aj.cond:
            for seg in [*aj.x_segs, aj.opt_seg]:
                self.arena.free(seg.name)
            for seg in aj.versions.values():
                self.arena.release_scratch(seg.name)
            aj.versions.clear()
        log.info("asynchronous job %s closed at version %d", quote(name), aj.job.latest)
        return aj

    @staticmethod
    def _check_alive(aj: AsyncJob) -> None:
        if aj.closed.is_set():
            raise LiflError("FAILED_PRECONDITION", f"asynchronous job {quote(aj.name)} was closed at version "
                                                   f"{aj.job.latest}")
        if aj.failed:
            raise LiflError("FAILED_PRECONDITION", f"asynchronous job {quote(aj.name)} failed at version "
                                                   f"{aj.job.latest}: {aj.failed}")

    def _on_stop(self, aj: AsyncJob, fn) -> None:
        """Have ``fn`` called when the job stops (closed, or the server shuts down)."""
        with aj.cond:
            aj.on_stop = [fn]   # one publisher, one wait at a time
        if self._stop.is_set() or aj.closed.is_set():
            fn()

    @staticmethod
    def _stopped(aj: AsyncJob) -> None:
        with aj.cond:
            fns, aj.on_stop = aj.on_stop, []
        for fn in fns:
            fn()

    # -- publishing ---------------------------------------------------------------------------
    def _publisher(self, aj: AsyncJob) -> None:
        b = 1
        stopped = lambda: self._stop.is_set() or aj.closed.is_set()   # noqa: E731
        while not stopped():
            with aj.cond:
                while not stopped() and aj.job.open_buffer <= b:
                    aj.cond.wait(0.5)
                if stopped():
                    return
                rid = aj.rounds[b]
                aj.weights.pop(b)
                aj.steps.pop(b, None)
            try:
                with self.dispatcher.model(aj.name, rid, False, 3600.0, cancel=lambda wake: self._on_stop(aj, wake)) \
                        as (_run, seg):
                    self._publish(aj, b, seg)
                with aj.cond:
                    aj.rounds.pop(b, None)
            except Exception as e:   # the tree failed this buffer: the job cannot go on exactly
                if stopped():
                    return
                with aj.cond:
                    aj.failed = f"buffer {b} (round {rid}) failed: {e}"
                    aj.cond.notify_all()
                log.error("asynchronous job %s failed: %s", quote(aj.name), aj.failed)
                return
            b += 1

    def _publish(self, aj: AsyncJob, version: int, result: Segment) -> None:
        """Publish buffer ``version``'s result, the new version its top function wrote (held, not
        copied)."""
        seg = self.arena.share(result.name)
        with aj.cond:
            aj.versions[version] = seg
            aj.job.published(version)
            for v in [v for v in aj.versions if v not in aj.job.kept()]:
                self.arena.release_scratch(aj.versions.pop(v).name)   # a reader still streaming it frees it last
            aj.cond.notify_all()
        self.metrics.versions_published.labels(aj.name).inc()
        log.info("asynchronous job %s published version %d", quote(aj.name), version)

    # -- pulls --------------------------------------------------------------------------------
    @contextmanager
    def model(self, aj: AsyncJob, version: int | None, wait_s: float,
              cancel: Callable[[Callable[[], None]], object] | None = None) -> Iterator[tuple[int, Segment]]:
        """Hold a kept version (``None``: the latest) for reading; waits up to ``wait_s`` for a
        version not yet published, or until the reader goes away (``cancel``: gRPC's
        ``context.add_callback``)."""
        give_up = time.monotonic() + wait_s
        gone = threading.Event()
        if cancel is not None:
            def went_away() -> None:
                gone.set()
                with aj.cond:
                    aj.cond.notify_all()
            if cancel(went_away) is False:   # gRPC: the call already ended
                gone.set()
        with aj.cond:
            if aj.closed.is_set():
                self._check_alive(aj)
            while version is not None and version > aj.job.latest and not aj.failed and not gone.is_set():
                left = give_up - time.monotonic()
                if left <= 0 or aj.closed.is_set():
                    break
                aj.cond.wait(left)
            v = aj.job.latest if version is None else version
            if v not in aj.versions:
                kept = f"versions {min(aj.versions)}..{max(aj.versions)} are kept"
                if v > aj.job.latest:
                    self._check_alive(aj)
                    raise LiflError("DEADLINE_EXCEEDED" if wait_s > 0 else "FAILED_PRECONDITION",
                                    f"version {v} is not published yet; the current version is {aj.job.latest} "
                                    f"({kept}); pull with a longer wait or pull latest")
                raise LiflError("NOT_FOUND", f"version {v} is no longer kept; {kept}, the current version is "
                                             f"{aj.job.latest}")
            seg = self.arena.share(aj.versions[v].name)
        try:
            yield v, seg
        finally:
            self.arena.free(seg.name)

    # -- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        for aj in self.all():
            with aj.cond:
                aj.cond.notify_all()
            self._stopped(aj)
        for t in self._threads:
            t.join(timeout=5.0)
