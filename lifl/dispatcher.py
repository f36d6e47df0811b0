"""The engine's façade: what the gateways call (admission, rounds, results), wired to its parts
under one lock.

Payloads stay where the gateway wrote them (shared-memory slots); only descriptors move. The
parts, each with one job and none importing this module: ``engine.reduction`` (the pure eager
tree of a round), ``engine.driver`` (turns reductions into function commands and replies back),
``engine.pool`` (functions: start, bind, queue, send), ``engine.recovery`` (function death,
node loss), ``engine.scaling`` (the autoscaler's decisions), ``engine.shaping`` (the planner's
and placement's decisions), ``engine.load`` (arrival and fold-time estimates), ``engine.store``
(the round table and the memory finished rounds hold), ``engine.ticker`` (the control loop that
never dies) and an injected ``engine.clock``. Blocking work — starting a function for a push,
allocating a round's (or a re-plan's) accumulators, which on Ray may wait on another node — is
prepared outside the lock and committed inside it.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from .admission import Admission
from .config import ServerConfig
from .control.autoscaler import capacity_bundles
from .engine.clock import Clock, SystemClock
from .engine.driver import RoundDriver, allocate, free
from .engine.load import LoadEstimator
from .engine.pool import FunctionPool
from .engine.reduction import Finalize, Fold, Update
from .engine.recovery import Recovery
from .engine.scaling import ScaleExecutor
from .engine.shaping import TreeShaper
from .engine.snapshot import EngineSnapshot, function_view, round_view
from .engine.store import Cancel, RoundRun, RoundTable, Task
from .engine.ticker import Ticker, guarded
from .durable import NO_JOURNAL, NoJournal
from .errors import LiflError
from .layout import Layout
from .metrics import Metrics
from .rounds import Digest, Round, State, job_name
from .runtime.base import Reply, Runtime
from .shm import Arena, Segment

log = logging.getLogger("lifl.dispatcher")


class Dispatcher(Admission):
    def __init__(self, config: ServerConfig, arena: Arena, runtime: Runtime, metrics: Metrics,
                 clock: Clock | None = None, ticker: bool = True, journal: NoJournal = NO_JOURNAL):
        """``journal``: durable mode's hook (``lifl.durable``); the default persists nothing."""
        self.config, self.arena, self.runtime, self.metrics = config, arena, runtime, metrics
        self.journal = journal
        self.clock = clock or SystemClock()
        self._lock = threading.RLock()
        self._next_rid = 1
        self._closing = False
        self.load = LoadEstimator()
        self.table = RoundTable(arena, config.keep_rounds, config.release_idle_shm, lambda n: self.driver.forget(n),
                                on_drop=journal.forgotten)
        self.shaper = TreeShaper(config, runtime.node_models)
        self.pool = FunctionPool(runtime, metrics, self.clock, max_functions=config.workers,
                                 on_message=self._on_message, wire=Task.wire,
                                 next_work=lambda fn: self.driver.next_update_fold(fn),
                                 fold_delay_s=config.fault_fold_delay_s, reuse=config.reuse_functions,
                                 inline_updates=config.update_transport == "pipe")
        gens = itertools.count(1)   # accumulator generations: never reused (fold.Journal)
        self.driver = RoundDriver(runtime, arena, self.table, self.pool, self.load, metrics, self.clock, gens,
                                  lazy=config.fold_when == "lazy", journal=journal)
        self.recovery = Recovery(runtime, self.pool, self.table, self.driver, metrics)
        self.scaler = ScaleExecutor(config, runtime, self.pool, self.table, self.load, metrics)
        runtime.events.on_node_lost = self.node_lost
        runtime.events.on_node_joined = self._node_joined
        runtime.prepare()
        with self._lock:
            for _ in range(config.min_workers):
                self.pool.start(runtime.head)
        self._ticker = None
        if ticker:
            self.start_ticker()

    def start_ticker(self) -> None:
        """Start the control loop (deadlines, autoscaling). Durable mode starts it only after
        recovery has re-accepted every logged update: a deadline that passed while the server
        was down must not close a round half replayed."""
        self._ticker = Ticker(self.tick, name="lifl-deadlines").start()

    @property
    def last_plan(self) -> str:
        return self.shaper.last_plan

    # -- replies from functions (runtime reader threads) ---------------------------------------
    def _on_message(self, handle, reply: Reply | None) -> None:
        """A function's reply (or its exit, ``reply is None``). An error here is logged and fails
        only the round the reply belongs to: the reader thread must go on reading (an exception
        reaching it would look like the function dying)."""
        with self._lock:
            fn = self.pool.find(handle)
            if fn is None:
                return
            task = fn.current
            try:
                if reply is None:
                    self.recovery.function_died(fn)
                else:
                    self.driver.reply(fn, reply)
            except Exception as e:
                eid = os.urandom(4).hex()
                log.exception("error %s handling %s from function %s", eid,
                              "its exit" if reply is None else "a reply", handle.id)
                if task is not None:
                    self.driver.fail(task.run, f"internal error {eid} handling a function's reply: {e}")

    # -- rounds ------------------------------------------------------------------------------
    def open_round(self, job: str, layout: Layout, expected: int, quorum: int, deadline_s: float,
                   initial: Segment | None, from_round: int = 0, step: dict | None = None,
                   resume: tuple[int, float] | None = None) -> Round:
        """``step``: a server optimizer the top applies at finalize (``RoundRun.step``).
        ``resume``: (round id, wall-clock opening) of a round recovered from the journal; its
        deadline counts from now until recovery has replayed its updates (``lifl.durable.recover``)."""
        quorum = Round.check_params(expected, quorum, deadline_s)
        job = job_name(job)
        staged = self.journal.stage(initial.buf) if initial is not None and resume is None else None
        try:
            with self._lock:
                if self._closing:
                    raise LiflError("UNAVAILABLE", "the server is shutting down")
                rid = resume[0] if resume else self._next_rid
                self._next_rid = max(self._next_rid, rid + 1)
                shape = self.shaper.shape(rid, expected, layout, deadline_s, self.load)
            segs = allocate(self.runtime, shape, 0, layout.numel)   # may wait on other nodes: unlocked
        except BaseException:
            self.journal.discard(staged)
            raise
        with self._lock:
            if self._closing:
                free(self.runtime, segs)
                self.journal.discard(staged)
                raise LiflError("UNAVAILABLE", "the server is shutting down")
            now, mono = self.clock.time(), self.clock.monotonic()
            opened = resume[1] if resume else now
            rnd = Round(job, rid, layout, expected, quorum, deadline_s, opened=opened, opened_mono=mono)
            self.journal.opened(rnd, staged, from_round)
            run = RoundRun(rnd, initial=initial, from_round=from_round, step=step)
            self.driver.install(run, shape, segs)
            self.table.runs[rid] = run
            if self._ticker is not None:
                self._ticker.wake()
            return rnd

    def _reshape(self, run: RoundRun):
        """Mid-round: a new shape when the measured arrival rate makes it worth it (while open:
        parents only fold after close), else None. After a node loss the rebuilt tree stands."""
        r = run.round
        if r.state != State.OPEN or run.lost_nodes:
            return None
        return self.shaper.reshape(run.shape, r.id, r.expected, len(r.accepted), r.layout, r.deadline_s,
                                   self.load, [leaf.node for leaf in run.leaves])

    def _replan(self, run: RoundRun, have: int, shape) -> None:
        """Adopt a re-plan: its new leaves' segments are allocated outside the lock, and adopted
        only if the round is still as it was (open, no leaf added or lost meanwhile)."""
        segs = allocate(self.runtime, shape, have, run.round.layout.numel)
        with self._lock:
            if run.round.state == State.OPEN and not run.lost_nodes and len(run.segs) == have:
                self.driver.install(run, shape, segs)
                self.metrics.replans.inc()
                return
        free(self.runtime, segs)

    def get(self, job: str, rid: int) -> RoundRun:
        return self.table.get(job, rid)

    def begin_push(self, job: str, rid: int, client: str) -> RoundRun:
        with self._lock:
            run = self.get(job, rid)
            run.round.begin(client, self.clock.monotonic())
            return run

    def check_open(self, run: RoundRun) -> None:
        if run.round.state != State.OPEN:
            raise LiflError("DEADLINE_EXCEEDED" if "deadline" in run.round.detail else "FAILED_PRECONDITION",
                            f"round {run.round.id} closed while this update was being received ({run.round.detail})")
        if run.round.past_deadline(self.clock.monotonic()):   # before the control loop closes it
            raise LiflError("DEADLINE_EXCEEDED", f"round {run.round.id}'s deadline passed while this update was "
                                                 "being received; it was not stored")

    def abandon(self, run: RoundRun, client: str) -> None:
        with self._lock:
            run.round.abandon(client)

    def restore(self, run: RoundRun) -> None:
        """Put a finished round recovered from the journal back in the table (``lifl.durable``)."""
        with self._lock:
            self._next_rid = max(self._next_rid, run.round.id + 1)
            self.table.runs[run.round.id] = run

    def accept(self, run: RoundRun, client: str, slot: str, weight: float, node: str = "",
               durable: str | None = None, digest: Digest | None = None) -> int:
        """Record a complete update (in ``slot`` on ``node``) and route it to a leaf fed by that
        node's gateway; returns the round's accepted count. A function for the leaf comes first:
        if it must be started, that happens outside the lock; if none can start, nothing is
        recorded and the client may push again (UNAVAILABLE). In durable mode the slot's bytes
        are persisted first, and the update is logged before it is recorded (``durable``: the
        file recovery re-accepts it from)."""
        staged = durable if durable is not None else (
            self.journal.stage(self.arena.get(slot).buf) if self.journal.on else None)
        try:
            return self._accept(run, client, slot, weight, node, staged, digest)
        except BaseException:
            if durable is None:
                self.journal.discard(staged)
            raise

    def _accept(self, run: RoundRun, client: str, slot: str, weight: float, node: str, staged: str | None,
                digest: Digest | None) -> int:
        t0 = self.clock.monotonic()
        node = node or self.runtime.head
        with self._lock:
            run.round.check_accept(weight, self.clock.monotonic())
            index = run.red.route(node)
            leaf_node = run.red.leaves[index].node
            cold = index not in run.workers and self.pool.reserve(leaf_node, "leaf")
        if cold:
            try:
                handle = self.pool.launch(leaf_node)
            finally:
                with self._lock:
                    self.pool.release(leaf_node)
        with self._lock:
            fresh = self.pool.adopt(handle) if cold else None
            run.round.check_accept(weight, self.clock.monotonic())
            if run.red.leaves[index].lost:   # its node went meanwhile
                index = run.red.route(node)
            if index not in run.workers:
                self.driver.bind(run, index, "leaf", fresh)
            now = self.clock.monotonic()
            run.round.check_accept(weight, now)   # nothing is logged for an update refused here
            self.journal.accepted(run.round.id, client, weight, staged, digest)   # fsynced before any ack
            run.round.accept(client, weight, now, digest)
            run.red.add(index, Update(slot, weight, client))
            self.load.arrived(node)
            self.metrics.updates_received.labels(run.round.job).inc()
            n = len(run.round.accepted)
            fn = run.workers[index]
            self.driver.maybe_close(run, forced=False)
            self.pool.pump(fn)
            cur = fn.current
            if cur is not None and isinstance(cur.cmd, (Fold, Finalize)) and any(u.slot == slot for u in cur.cmd.updates):
                start = "cold" if cold else "warm"
                self.metrics.dispatches.labels(start).inc()
                self.metrics.dispatch_seconds.labels(start).observe(self.clock.monotonic() - t0)
            return n

    def close_round(self, job: str, rid: int, abort: bool) -> Round:
        with self._lock:
            run = self.get(job, rid)
            if run.round.state != State.OPEN:
                raise LiflError("FAILED_PRECONDITION", f"round {rid} is already {run.round.state.name.lower()}")
            if abort:
                self.driver.fail(run, "aborted by an operator")
            else:
                self.driver.maybe_close(run, forced=True)
            return run.round

    # -- results and views --------------------------------------------------------------------
    @contextmanager
    def model(self, job: str, rid: int, initial: bool, wait_s: float,
              cancel: Cancel | None = None) -> Iterator[tuple[RoundRun, Segment]]:
        """Hold a round's result (or initial model) for reading; waits up to wait_s for the result,
        or until the reader goes away (``cancel``, e.g. gRPC's ``context.add_callback``: its thread
        is freed at once)."""
        with self._lock:
            run = self.get(job, rid)
            run.readers += 1
        try:
            yield run, (self.table.initial_of(run) if initial else self.table.result_of(run, wait_s, cancel))
        finally:
            with self._lock:
                run.readers -= 1
                if run.readers == 0 and run.finished:
                    self.table.evict_old()   # what a reader kept alive may go now

    def rounds(self) -> list[Round]:
        with self._lock:
            return [r.round for r in self.table.all()]

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            return EngineSnapshot(tuple(function_view(f) for f in self.pool.functions),
                                  tuple(round_view(r) for r in self.table.all()), self.shaper.last_plan)

    # -- time ----------------------------------------------------------------------------------
    def tick(self) -> float | None:
        """One step of the control loop: deadlines, re-planning, autoscaling. Returns when the next
        is due: 50 ms while a round is open, 0.5 s while functions wait out their keep-alive, never
        (None) when nothing runs — an idle service burns no CPU. The ticker thread calls it; with a
        manual clock (``engine.clock``) a test or simulation calls it after advancing time."""
        with self._lock:
            replans = []
            for run in self.table.all():
                guarded(f"deadline of round {run.round.id}", self._tick_deadline, run)
                shape = guarded(f"re-planning round {run.round.id}", self._reshape, run)
                if shape is not None:
                    replans.append((run, len(run.segs), shape))
        for run, have, shape in replans:
            guarded(f"re-planning round {run.round.id}", self._replan, run, have, shape)
        with self._lock:
            guarded("autoscaling", self.scaler.step, self.clock.monotonic(), self._closing)
            running = self.table.any_running()
            wake = 0.05 if any(r.round.state == State.OPEN for r in self.table.all()) else (
                0.5 if self.pool.functions else None)
        # room in the cluster while rounds run, none when idle (a cluster autoscaler acts on it)
        guarded("asking for capacity", self.runtime.request_capacity,
                capacity_bundles(running, self.config.workers, self.config.function_cpus))
        return wake

    def _tick_deadline(self, run: RoundRun) -> None:
        if run.round.state == State.OPEN and run.round.deadline_s:
            self.driver.maybe_close(run, forced=False)

    # -- nodes and shutdown ----------------------------------------------------------------------
    def node_lost(self, node: str) -> None:
        """The runtime lost a node (and with it that node's gateway, functions and shared memory)."""
        with self._lock:
            self.recovery.node_lost(node)

    def _node_joined(self, node: str) -> None:
        log.info("node %s joined; the next rounds may place leaves there", node)
        self.metrics.nodes_joined.inc()

    def close(self) -> None:
        with self._lock:
            self._closing = self.recovery.closing = True
            # durable mode: a shutdown is not a failure; what the journal holds resumes on restart
            journal, self.journal, self.driver.journal = self.journal, NO_JOURNAL, NO_JOURNAL
            self.table.on_drop = NO_JOURNAL.forgotten
            journal.close()
            for run in self.table.all():  # failing a round evicts finished ones: iterate a copy
                if run.running:
                    self.driver.fail(run, "the server shut down" + (
                        "; durable mode resumes this round when it starts again" if journal.on else ""))
        if self._ticker is not None:
            self._ticker.stop()
        self.runtime.close()
