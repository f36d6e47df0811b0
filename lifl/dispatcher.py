"""The dispatcher: turns descriptor events and policy decisions into function commands.

Payloads stay where the gateway wrote them (shared-memory slots); only
descriptors (slot name, weight) move. Each update is routed to a leaf as soon
as it is complete (eager aggregation); a function that is busy gets every
update that queued up meanwhile in one fused fold. When a round closes, each
parent folds its children's partial sums as soon as they are complete, and the
top finalises Σwᵢxᵢ/Σwᵢ into a result segment that Pull serves.

The hierarchy's shape and the routing of updates come from ``control.planner``
(pure policy); this module only executes them through a runtime.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .config import ServerConfig
from .control.planner import Hierarchy, plan_static, route_leaf
from .errors import LiflError
from .layout import Layout
from .metrics import Metrics
from .rounds import Round, State
from .shm import Arena, Segment

MAX_BATCH = 16  # updates per fold command


@dataclass
class LeafRun:
    """A leaf's state. Its float64 partial sum ping-pongs between two segments: a fold
    reads ``acc`` and writes ``spare``, and only the reply commits the swap, so a
    function killed mid-fold leaves ``acc`` intact and the fold is re-run exactly once."""

    index: int
    worker: "WorkerSlot"
    accs: tuple[Segment, Segment]
    cur: int = 0
    pending: list[tuple[str, float]] = field(default_factory=list)
    folding: int = 0
    folded: int = 0

    @property
    def acc(self) -> Segment:
        return self.accs[self.cur]

    @property
    def spare(self) -> Segment:
        return self.accs[1 - self.cur]

    def commit(self) -> None:
        self.cur = 1 - self.cur


@dataclass
class RoundRun:
    round: Round
    hier: Hierarchy
    leaves: list[LeafRun]
    initial: Segment | None = None
    result: Segment | None = None
    done_event: threading.Event = field(default_factory=threading.Event)
    nodes_done: set[tuple[int, int]] = field(default_factory=set)
    children_folded: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    children_folding: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    finalizing: bool = False
    tasks_in_flight: int = 0
    readers: int = 0
    cursor: int = 0
    num_updates: int = 0
    released: bool = False


@dataclass
class Task:
    cmd: dict
    run: RoundRun | None
    on_done: Callable[[dict], None] | None = None


class WorkerSlot:
    """A function plus what the dispatcher knows about it."""

    def __init__(self, handle):
        self.handle = handle
        self.queue: collections.deque[Task] = collections.deque()
        self.current: Task | None = None
        self.layouts: set[int] = set()
        self.folds = 0
        self.updates_folded = 0
        self.role = "idle"
        self.dead = False


class Dispatcher:
    def __init__(self, config: ServerConfig, arena: Arena, runtime, metrics: Metrics):
        self.config, self.arena, self.runtime, self.metrics = config, arena, runtime, metrics
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._round_ids = itertools.count(1)
        self._runs: dict[int, RoundRun] = {}
        self._workers: list[WorkerSlot] = []
        self._closing = False
        for _ in range(config.workers):
            self._spawn()
        self._ticker = threading.Thread(target=self._tick_loop, name="lifl-deadlines", daemon=True)
        self._stop = threading.Event()
        self._ticker.start()

    # -- functions -----------------------------------------------------------
    def _spawn(self) -> WorkerSlot:
        handle = self.runtime.start_worker(self._on_message)
        slot = WorkerSlot(handle)
        self._workers.append(slot)
        self.metrics.cold_starts.inc()
        return slot

    def _slot_of(self, handle) -> WorkerSlot | None:
        for w in self._workers:
            if w.handle is handle:
                return w
        return None

    def _enqueue(self, w: WorkerSlot, task: Task) -> None:
        w.queue.append(task)
        if task.run is not None:
            task.run.tasks_in_flight += 1
        self._pump(w)

    def _pump(self, w: WorkerSlot) -> None:
        """Send w its next command if it is idle: queued tasks first, then pending updates."""
        if w.current is not None or w.dead:
            return
        task = w.queue.popleft() if w.queue else self._next_update_fold(w)
        if task is None:
            w.role = "idle"
            return
        cmd = task.cmd
        cmd["seq"] = next(self._seq)
        lid = cmd.get("layout")
        if lid is not None and lid not in w.layouts and task.run is not None:
            cmd["specs"] = [[s.name, s.dtype, list(s.shape)] for s in task.run.round.layout.specs]
            w.layouts.add(lid)
        w.current = task
        try:
            w.handle.send(cmd)
        except OSError:
            pass  # its death is reported by the reader thread

    def _next_update_fold(self, w: WorkerSlot) -> Task | None:
        for run in self._runs.values():
            if run.round.state not in (State.OPEN, State.AGGREGATING):
                continue
            for leaf in run.leaves:
                if leaf.worker is w and leaf.pending and not leaf.folding:
                    batch, leaf.pending = leaf.pending[:MAX_BATCH], leaf.pending[MAX_BATCH:]
                    leaf.folding = len(batch)
                    run.tasks_in_flight += 1
                    w.role = "leaf"
                    self.metrics.warm_reuses.inc()
                    return Task({"op": "fold", "layout": run.round.id, "acc": leaf.spare.name,
                                 "base": leaf.acc.name, "updates": [[n, wt] for n, wt in batch]}, run,
                                lambda r, run=run, leaf=leaf, batch=batch: self._leaf_folded(run, leaf, batch, r))
        return None

    def _on_message(self, handle, msg: dict | None) -> None:
        with self._lock:
            w = self._slot_of(handle)
            if w is None:
                return
            if msg is None:
                self._worker_died(w)
                return
            task, w.current = w.current, None
            if task is not None:
                if task.run is not None:
                    task.run.tasks_in_flight -= 1
                if not msg.get("ok"):
                    self._fail(task.run, f"aggregator function {handle.id} failed: {msg.get('error')}")
                elif task.on_done is not None:
                    w.folds += 1
                    task.on_done(msg)
                if task.run is not None:
                    self._maybe_release(task.run)
            self._pump(w)

    def _worker_died(self, w: WorkerSlot) -> None:
        """Start a replacement, hand it the dead function's leaves, and re-run its unfinished commands.

        Safe because commands never modify their inputs (folds write the spare
        accumulator, finalize writes the result) and update slots are released
        only when the fold that read them is committed: nothing is folded twice.
        """
        w.dead = True
        self._workers.remove(w)
        if self._closing:
            return
        self.metrics.function_failures.inc()
        try:
            repl = self._spawn()
        except Exception as e:  # cannot even restart: fail what depended on it
            for run in list(self._runs.values()):
                if any(leaf.worker is w for leaf in run.leaves):
                    self._fail(run, f"aggregator function {w.handle.id} died and no replacement started: {e}")
            return
        for run in self._runs.values():
            for leaf in run.leaves:
                if leaf.worker is w:
                    leaf.worker = repl
        tasks = ([w.current] if w.current is not None else []) + list(w.queue)
        w.current, w.queue = None, collections.deque()
        for task in tasks:
            if task.run is None or task.run.round.state == State.FAILED:
                if task.run is not None:
                    task.run.tasks_in_flight -= 1
                    self._maybe_release(task.run)
                continue
            task.cmd.pop("seq", None)
            task.cmd.pop("specs", None)
            repl.queue.append(task)
            self.metrics.tasks_retried.inc()
        self._pump(repl)

    # -- rounds --------------------------------------------------------------
    def open_round(self, job: str, layout: Layout, expected: int, quorum: int, deadline_s: float,
                   initial: Segment | None) -> Round:
        quorum = Round.check_params(expected, quorum, deadline_s)
        with self._lock:
            if self._closing:
                raise LiflError("UNAVAILABLE", "the server is shutting down")
            rid = next(self._round_ids)
            rnd = Round(job, rid, layout, expected, quorum, deadline_s)
            hier = plan_static(min(self.config.leaves, len(self._workers)), self.config.fan_in)
            leaves = []
            for i in range(hier.leaves):
                w = self._workers[(rid + i) % len(self._workers)]
                leaves.append(LeafRun(i, w, (self.arena.scratch(layout.numel * 8),
                                             self.arena.scratch(layout.numel * 8))))
            run = RoundRun(rnd, hier, leaves, initial=initial, result=self.arena.scratch(layout.total_size))
            self._runs[rid] = run
            for leaf in leaves:
                self._enqueue(leaf.worker, Task({"op": "reset", "layout": rid, "acc": leaf.acc.name}, run))
            return rnd

    def get(self, job: str, rid: int) -> RoundRun:
        run = self._runs.get(rid)
        if run is None or (job and run.round.job != job):
            raise LiflError("NOT_FOUND", f"round {rid} of job {job or '(any)'!r} does not exist on this server")
        return run

    def begin_push(self, job: str, rid: int, client: str) -> RoundRun:
        with self._lock:
            run = self.get(job, rid)
            run.round.begin(client)
            return run

    def check_open(self, run: RoundRun) -> None:
        if run.round.state != State.OPEN:
            raise LiflError("DEADLINE_EXCEEDED" if "deadline" in run.round.detail else "FAILED_PRECONDITION",
                            f"round {run.round.id} closed while this update was being received ({run.round.detail})")

    def abandon(self, run: RoundRun, client: str) -> None:
        with self._lock:
            run.round.abandon(client)

    def accept(self, run: RoundRun, client: str, slot: str, weight: float) -> int:
        """Record a complete update and route it to a leaf; returns the round's accepted count."""
        with self._lock:
            run.round.accept(client, weight, time.monotonic())
            pend = [len(leaf.pending) for leaf in run.leaves]
            busy = [leaf.folding > 0 for leaf in run.leaves]
            i = route_leaf(pend, busy, run.cursor)
            run.cursor = (i + 1) % len(run.leaves)
            run.leaves[i].pending.append((slot, weight))
            run.num_updates += 1
            self.metrics.updates_received.labels(run.round.job).inc()
            n = len(run.round.accepted)
            self._maybe_close(run, forced=False)
            self._pump(run.leaves[i].worker)
            return n

    def _leaf_folded(self, run: RoundRun, leaf: LeafRun, batch, reply: dict) -> None:
        leaf.commit()
        leaf.folding = 0
        leaf.folded += len(batch)
        leaf.worker.updates_folded += len(batch)
        self.metrics.fold_seconds.labels("leaf").observe(reply.get("seconds", 0.0))
        for name, _ in batch:
            self.arena.release_slot(name)
        self._advance(run)

    def close_round(self, job: str, rid: int, abort: bool) -> Round:
        with self._lock:
            run = self.get(job, rid)
            if run.round.state != State.OPEN:
                raise LiflError("FAILED_PRECONDITION", f"round {rid} is already {run.round.state.name.lower()}")
            if abort:
                self._fail(run, "aborted by an operator")
            else:
                self._maybe_close(run, forced=True)
            return run.round

    def _maybe_close(self, run: RoundRun, forced: bool) -> None:
        to = run.round.decide_close(time.time(), forced)
        if to is None:
            return
        detail = run.round.close_detail(time.time(), forced)
        if to == State.FAILED:
            self._fail(run, detail)
            return
        run.round.close(State.AGGREGATING, detail)
        self._advance(run)

    def _fail(self, run: RoundRun | None, detail: str) -> None:
        if run is None or run.round.state in (State.DONE, State.FAILED):
            return
        run.round.close(State.FAILED, detail)
        self.metrics.rounds.labels("failed").inc()
        for leaf in run.leaves:
            for name, _ in leaf.pending:
                self.arena.release_slot(name)
            leaf.pending.clear()
        run.done_event.set()
        self._maybe_release(run)

    # -- reduction -------------------------------------------------------------
    def _advance(self, run: RoundRun) -> None:
        """Move the reduction forward: complete leaves, fold ready partials, finalise the top."""
        if run.round.state != State.AGGREGATING:
            return
        hier, done = run.hier, run.nodes_done
        for leaf in run.leaves:
            if not leaf.pending and not leaf.folding:
                done.add((0, leaf.index))
        for level in range(1, hier.depth):
            for j, kids in enumerate(hier.levels[level]):
                node = (level, j)
                if node in done or (level - 1, kids[0]) not in done:
                    continue
                folded = run.children_folded.setdefault(node, set())
                folding = run.children_folding.setdefault(node, set())
                ready = [k for k in kids[1:] if (level - 1, k) in done and k not in folded and k not in folding]
                if ready and not folding:
                    folding.update(ready)
                    host = run.leaves[hier.host(level, j)]
                    parts = [run.leaves[hier.host(level - 1, k)].acc.name for k in ready]
                    self._enqueue(host.worker, Task(
                        {"op": "fold", "layout": run.round.id, "acc": host.spare.name, "base": host.acc.name,
                         "partials": parts}, run,
                        lambda r, run=run, node=node, ready=ready: self._partials_folded(run, node, ready, r)))
                if len(folded) == len(kids) - 1:
                    done.add(node)
        top = (hier.depth - 1, 0)
        if top in done and not run.finalizing:
            run.finalizing = True
            host = run.leaves[hier.host(*top)]
            self._enqueue(host.worker, Task(
                {"op": "finalize", "layout": run.round.id, "acc": host.acc.name,
                 "weight": run.round.total_weight, "out": run.result.name}, run,
                lambda r, run=run: self._finalized(run, r)))

    def _partials_folded(self, run: RoundRun, node, ready, reply: dict) -> None:
        run.leaves[run.hier.host(*node)].commit()
        run.children_folding[node].difference_update(ready)
        run.children_folded[node].update(ready)
        self.metrics.fold_seconds.labels("middle" if node[0] < run.hier.depth - 1 else "top").observe(
            reply.get("seconds", 0.0))
        self._advance(run)

    def _finalized(self, run: RoundRun, reply: dict) -> None:
        rnd = run.round
        rnd.post_arrival_s = time.monotonic() - rnd.last_arrival
        rnd.state = State.DONE
        self.metrics.post_arrival.observe(rnd.post_arrival_s)
        self.metrics.round_duration.observe(time.time() - rnd.opened)
        self.metrics.rounds.labels("done").inc()
        run.done_event.set()
        self._evict_old()

    def _maybe_release(self, run: RoundRun) -> None:
        """Give a finished round's accumulators back once no command still uses them."""
        if run.released or run.tasks_in_flight > 0 or run.round.state not in (State.DONE, State.FAILED):
            return
        run.released = True
        for leaf in run.leaves:
            for seg in leaf.accs:
                self.arena.release_scratch(seg.name)
        for w in {id(leaf.worker): leaf.worker for leaf in run.leaves}.values():
            if run.round.id in w.layouts:
                w.layouts.discard(run.round.id)
                self._enqueue(w, Task({"op": "forget", "segments": [], "layouts": [run.round.id]}, None))

    def _evict_old(self) -> None:
        finished = [r for r in self._runs.values() if r.round.state in (State.DONE, State.FAILED)]
        for run in finished[:-self.config.keep_rounds] if self.config.keep_rounds else finished:
            if run.readers == 0 and run.released:
                self.arena.release_scratch(run.result.name)
                if run.initial is not None:
                    self.arena.free(run.initial.name)
                del self._runs[run.round.id]

    # -- results -----------------------------------------------------------------
    @contextmanager
    def model(self, job: str, rid: int, initial: bool, wait_s: float) -> Iterator[tuple[RoundRun, Segment]]:
        """Hold a round's result (or initial model) for reading; waits up to wait_s for the result."""
        with self._lock:
            run = self.get(job, rid)
            run.readers += 1
        try:
            if initial:
                if run.initial is None:
                    raise LiflError("NOT_FOUND", f"round {rid} was opened without an initial model")
                yield run, run.initial
                return
            if not run.done_event.wait(max(0.0, wait_s)):
                raise LiflError("DEADLINE_EXCEEDED" if wait_s > 0 else "FAILED_PRECONDITION",
                                f"round {rid} has no result yet (state {run.round.state.name.lower()}, "
                                f"{len(run.round.accepted)}/{run.round.expected} updates); pull with a longer wait")
            if run.round.state == State.FAILED:
                raise LiflError("FAILED_PRECONDITION", f"round {rid} failed: {run.round.detail}")
            yield run, run.result
        finally:
            with self._lock:
                run.readers -= 1

    def rounds(self) -> list[Round]:
        with self._lock:
            return [r.round for r in self._runs.values()]

    def workers(self) -> list[WorkerSlot]:
        with self._lock:
            return list(self._workers)

    def queue_depth(self) -> int:
        with self._lock:
            return sum(len(l.pending) + l.folding for r in self._runs.values() for l in r.leaves)

    # -- time --------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                for run in list(self._runs.values()):
                    if run.round.state == State.OPEN and run.round.deadline_s:
                        self._maybe_close(run, forced=False)
                self.metrics.queue_depth.set(sum(len(l.pending) + l.folding
                                                 for r in self._runs.values() for l in r.leaves))

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for run in self._runs.values():
                if run.round.state in (State.OPEN, State.AGGREGATING):
                    self._fail(run, "the server shut down")
        self._stop.set()
        self._ticker.join(timeout=2)
        self.runtime.close()
