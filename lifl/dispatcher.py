"""The engine's façade: what the gateways call (admission, rounds, results) wired to its parts.

Payloads stay where the gateway wrote them (shared-memory slots); only descriptors move. The
parts, each with one job: ``engine.reduction`` (the pure eager tree of a round: what to fold
where and when), ``engine.pool`` (functions: start, bind, queue, send), ``engine.shaping``
(the planner's and placement's decisions), ``engine.load`` (arrival and fold-time estimates),
``engine.store`` (the round table and the memory finished rounds hold), ``engine.ticker`` (the
control loop that never dies) and an injected ``engine.clock``. This module wires them under one
lock, executes the autoscaler's decisions and recovers from failures: a function that dies is
replaced and its commands re-sent (exactly once, by the journal); a lost node's updates are
taken back and the tree rebuilt over what survives.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from . import fold
from .config import ServerConfig
from .control.autoscaler import decide
from .control.model import AutoscalerState, InstanceState, Node, Observation, ScalePolicy
from .engine.clock import Clock, SystemClock
from .engine.load import LoadEstimator
from .engine.pool import FunctionPool, PooledFunction
from .engine.reduction import Command, Finalize, Fold, Reduction, Update
from .engine.shaping import Shape, TreeShaper, local_node
from .engine.store import LeafSegs, RoundRun, RoundTable, Task
from .engine.ticker import Ticker, guarded
from .errors import LiflError, quote
from .layout import Layout
from .metrics import Metrics
from .rounds import Round, State, job_name
from .shm import Arena, Segment

log = logging.getLogger("lifl.dispatcher")

class Dispatcher:
    def __init__(self, config: ServerConfig, arena: Arena, runtime, metrics: Metrics,
                 clock: Clock | None = None, ticker: bool = True):
        self.config, self.arena, self.runtime, self.metrics = config, arena, runtime, metrics
        self.clock = clock or SystemClock()
        self._lock = threading.RLock()
        self._round_ids = itertools.count(1)
        self._gens = itertools.count(1)     # accumulator generations: never reused (fold.Journal)
        self._closing = False
        # a multi-node runtime (Ray) describes its nodes and stores; the local one has one of each
        self.multi_node = hasattr(runtime, "node_models")
        self._lost_nodes: set[str] = set()
        self.policy = ScalePolicy(keep_alive_s=config.keep_alive_s, min_instances=config.min_workers,
                                  max_instances=config.workers, stabilization_s=min(10.0, config.keep_alive_s))
        self._scale_state = AutoscalerState()
        self.load = LoadEstimator()
        self.table = RoundTable(arena, config.keep_rounds, config.release_idle_shm, self._forget)
        self.shaper = TreeShaper(config, self._nodes, self.multi_node)
        self.pool = FunctionPool(runtime, metrics, self.clock, max_functions=config.workers, node_cap=self._node_cap,
                                 pin_node=self.multi_node, on_message=self._on_message, wire=Task.wire,
                                 next_work=self._next_update_fold, fold_delay_s=config.fault_fold_delay_s)
        if self.multi_node:
            runtime.on_node_lost = self.node_lost
        if hasattr(runtime, "prepare"):
            runtime.prepare()
        for _ in range(config.min_workers):
            self.pool.start()
        self._ticker = Ticker(self.tick, name="lifl-deadlines").start() if ticker else None

    @property
    def last_plan(self) -> str:
        return self.shaper.last_plan

    # -- nodes and their stores ---------------------------------------------------------
    def _nodes(self) -> list[Node]:
        """The nodes functions may run on (alive ones), as the policies see them."""
        if self.multi_node:
            return [n for n in self.runtime.node_models() if n.name not in self._lost_nodes]
        return [local_node(self.config, self.arena.budget)]

    def _node_cap(self, node: str) -> int:
        if not self.multi_node:
            return self.config.workers
        cores = next((n.cores for n in self.runtime.node_models() if n.name == node), 0.0)
        return max(1, int(cores // self.config.function_cpus))

    def _store(self, node: str):
        return self.runtime.store(node) if self.multi_node else self.arena

    def _store_of(self, segment: str):
        return self.runtime.store_of(segment) if self.multi_node else self.arena

    def _release_slot(self, name: str) -> None:
        self._store_of(name).release_slot(name)

    # -- functions ------------------------------------------------------------------------
    def _bind(self, run: RoundRun, index: int, role: str) -> str:
        fn, how = self.pool.bind(run.red.leaves[index].node, role)
        run.workers[index] = fn
        return how

    def _bind_or_fail(self, run: RoundRun, index: int, role: str) -> bool:
        """Bind a parent's function; if none can start, the round fails with the reason."""
        try:
            self._bind(run, index, role)
            return True
        except LiflError as e:
            self._fail(run, f"no aggregator function for the {role} could start: {e.message}")
            return False

    def _enqueue(self, fn: PooledFunction, task: Task) -> None:
        if task.run is not None:
            task.run.tasks_in_flight += 1
        self.pool.enqueue(fn, task)

    def _forget(self, names: list[str]) -> None:
        for fn in self.pool.functions:
            if not fn.dead:
                self._enqueue(fn, Task({"op": "forget", "segments": names, "layouts": []}, None))

    def _next_update_fold(self, fn: PooledFunction) -> Task | None:
        for run in self.table.all():
            if not run.running:
                continue
            for index, bound in run.workers.items():
                if bound is fn:
                    cmd = run.red.take_fold(index)
                    if cmd is not None:
                        run.tasks_in_flight += 1
                        fn.role = "leaf"
                        return Task(cmd, run)
        return None

    def _on_message(self, handle, msg: dict | None) -> None:
        """A function's reply (or its exit, ``msg is None``), from the runtime's reader thread.
        An error here is logged and fails only the round the reply belongs to: the reader
        thread must go on reading (an exception reaching it would look like the function dying)."""
        with self._lock:
            fn = self.pool.find(handle)
            if fn is None:
                return
            task = fn.current
            try:
                if msg is None:
                    self._function_died(fn)
                else:
                    self._reply(fn, msg)
            except Exception as e:
                eid = os.urandom(4).hex()
                log.exception("error %s handling %s from function %s", eid, "its exit" if msg is None else "a reply",
                              getattr(handle, "id", "?"))
                if task is not None:
                    self._fail(task.run, f"internal error {eid} handling a function's reply: {e}")

    def _reply(self, fn: PooledFunction, msg: dict) -> None:
        task = self.pool.finished(fn)
        if task is not None:
            run = task.run
            if run is not None:
                run.tasks_in_flight -= 1
            if not msg.get("ok"):
                if msg.get("lost_input") and run is not None and run.lost_nodes and task.kind == "partial":
                    # a child's partial went down with its node: the rebuild re-reduces
                    run.red.abandon(task.cmd, torn=task.attempts > 1)
                else:
                    self._fail(run, f"aggregator function {fn.handle.id} failed: {msg.get('error')}")
            elif run is not None and not isinstance(task.cmd, dict):
                fn.folds += 1
                self._committed(run, fn, task.cmd, msg)
            if run is not None:
                if run.red.needs_rebuild:
                    self._try_rebuild(run)
                self._maybe_release(run)
        self.pool.pump(fn)

    def _function_died(self, fn: PooledFunction) -> None:
        """Start a replacement, hand it the dead function's leaves, and re-send its unfinished commands.

        Safe because commands never modify their inputs (a fold re-sent resumes from its
        journal, finalize writes the result) and update slots are released only when the fold
        that read them is committed: nothing is folded twice."""
        if self.multi_node and not self.runtime.node_alive(fn.node):
            self._node_lost(fn.node)  # the whole node went: its leaves' sums went with it
            return
        idle = not fn.bindings and fn.current is None and not fn.queue
        tasks = self.pool.remove(fn)
        if self._closing:
            return
        self.metrics.function_failures.inc()
        if idle:
            return  # nothing to recover, nothing to replace (serverless)
        log.warning("aggregator function %s died while it had work; starting a replacement", fn.handle.id)
        try:
            repl = self.pool.start(fn.node)
        except LiflError as e:  # cannot even restart: fail what depended on it
            log.error("no replacement for function %s: %s", fn.handle.id, e.message)
            for run in self.table.all():
                if fn in run.workers.values():
                    self._fail(run, f"aggregator function {fn.handle.id} died and no replacement started: {e.message}")
            return
        for run in self.table.all():
            for index, bound in run.workers.items():
                if bound is fn:
                    run.workers[index] = repl
                    repl.bindings += 1
        for task in tasks:
            if task.run is None or task.run.round.state == State.FAILED:
                if task.run is not None:
                    task.run.tasks_in_flight -= 1
                    self._maybe_release(task.run)
                continue
            task.attempts += 1
            repl.queue.append(task)
            self.metrics.tasks_retried.inc()
        self.pool.pump(repl)

    # -- rounds ---------------------------------------------------------------------------------
    def open_round(self, job: str, layout: Layout, expected: int, quorum: int, deadline_s: float,
                   initial: Segment | None, from_round: int = 0) -> Round:
        quorum = Round.check_params(expected, quorum, deadline_s)
        job = job_name(job)
        with self._lock:
            if self._closing:
                raise LiflError("UNAVAILABLE", "the server is shutting down")
            rid = next(self._round_ids)
            rnd = Round(job, rid, layout, expected, quorum, deadline_s, opened=self.clock.time(),
                        opened_mono=self.clock.monotonic())
            run = RoundRun(rnd, initial=initial, from_round=from_round)
            try:
                self._adopt(run, self.shaper.shape(rid, expected, layout, deadline_s, self.load))
            except BaseException:
                self._release_accs(run)
                raise
            self.table.runs[rid] = run
            if self._ticker is not None:
                self._ticker.wake()
            return rnd

    def _adopt(self, run: RoundRun, shape: Shape) -> None:
        """Allocate accumulators for the leaves a shape adds (all of them for a new round) and adopt
        it. Segments are recorded as they are made, so a failure frees them all."""
        numel = run.round.layout.numel
        new = list(zip(shape.nodes, shape.homes))[len(run.segs):]
        for node, _ in new:
            store = self._store(node)
            acc = store.scratch(numel * 8)
            try:
                run.segs.append(LeafSegs(acc, store.scratch(fold.journal_bytes(numel))))
            except BaseException:
                store.release_scratch(acc.name)
                raise
        if run.red is None:
            run.red = Reduction(run.round.id, shape.hier, new, self._gens)
        else:
            run.red.extend(shape.hier, new)
        run.shape = shape

    def _release_accs(self, run: RoundRun) -> None:
        for index, segs in enumerate(run.segs):
            if run.red is None or run.red.leaves[index].node not in run.lost_nodes:  # those went with their node
                for seg in (segs.acc, segs.journal):
                    self._store_of(seg.name).release_scratch(seg.name)

    def _replan(self, run: RoundRun) -> None:
        """Mid-round: adopt a new plan when the measured arrival rate makes it worth it (while open:
        parents only fold after close). After a node loss the rebuilt tree stands."""
        r = run.round
        if r.state != State.OPEN or run.lost_nodes:
            return
        shape = self.shaper.reshape(run.shape, r.id, r.expected, len(r.accepted), r.layout, r.deadline_s,
                                    self.load, [leaf.node for leaf in run.leaves])
        if shape is not None:
            self._adopt(run, shape)
            self.metrics.replans.inc()

    def get(self, job: str, rid: int) -> RoundRun:
        return self.table.get(job, rid)

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

    def accept(self, run: RoundRun, client: str, slot: str, weight: float, node: str = "") -> int:
        """Record a complete update (in ``slot`` on ``node``) and route it to a leaf fed by that
        node's gateway; returns the round's accepted count."""
        t0 = self.clock.monotonic()
        with self._lock:
            node = node or (self.runtime.head if self.multi_node else "local")
            run.round.check_accept(weight)
            index = run.red.route(node)
            # a function for the leaf first: if none can start, nothing is recorded and the
            # client may push again (UNAVAILABLE); an update is never counted without a folder
            how = self._bind(run, index, "leaf") if index not in run.workers else "warm"
            run.round.accept(client, weight, self.clock.monotonic())
            run.red.add(index, Update(slot, weight, client))
            self.load.arrived(node)
            self.metrics.updates_received.labels(run.round.job).inc()
            n = len(run.round.accepted)
            fn = run.workers[index]
            self._maybe_close(run, forced=False)
            self.pool.pump(fn)
            cur = fn.current
            if cur is not None and isinstance(cur.cmd, Fold) and any(u.slot == slot for u in cur.cmd.updates):
                start = "cold" if how == "cold" else "warm"
                self.metrics.dispatches.labels(start).inc()
                self.metrics.dispatch_seconds.labels(start).observe(self.clock.monotonic() - t0)
            return n

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
        to = run.round.decide_close(self.clock.monotonic(), forced)
        if to is None:
            return
        detail = run.round.close_detail(forced)
        if to == State.FAILED:
            self._fail(run, detail)
            return
        run.round.close(State.AGGREGATING, detail, self.clock.time())
        run.red.close()
        self._advance(run)

    def _fail(self, run: RoundRun | None, detail: str) -> None:
        if run is None or run.finished:
            return
        run.round.close(State.FAILED, detail, self.clock.time())
        log.warning("round %d of job %s failed: %s", run.round.id, quote(run.round.job), detail)
        self.metrics.rounds.labels("failed").inc()
        for name in run.red.drain_pending():
            self._release_slot(name)
        run.done_event.set()
        self._maybe_release(run)
        self.table.evict_old()

    # -- the reduction -------------------------------------------------------------------------
    def _advance(self, run: RoundRun) -> None:
        """Start what the reduction says may start: parents' partial folds, then the finalize."""
        if run.round.state != State.AGGREGATING:
            return
        for cmd in run.red.ready():
            role = "top" if isinstance(cmd, Finalize) or cmd.parent[0] == run.red.hier.depth - 1 else "middle"
            if cmd.leaf not in run.workers and not self._bind_or_fail(run, cmd.leaf, role):
                return
            fn = run.workers[cmd.leaf]
            if isinstance(cmd, Fold) and fn.role != role:
                self.metrics.warm_reuses.inc()  # a finished leaf takes a parent's role
            fn.role = role
            if isinstance(cmd, Finalize):
                run.result = self.arena.result_segment(run.round.layout.total_size)
            self._enqueue(fn, Task(cmd, run))

    def _committed(self, run: RoundRun, fn: PooledFunction, cmd: Command, reply: dict) -> None:
        """A function finished a command: commit it to the reduction, free what it read, go on."""
        secs = reply.get("seconds", 0.0)
        if isinstance(cmd, Finalize):
            run.red.commit(cmd)
            self._finalized(run)
            return
        for name in run.red.commit(cmd):
            self._release_slot(name)
        if cmd.updates:
            fn.updates_folded += len(cmd.updates)
            self.load.folded(secs, len(cmd.updates))
            self.metrics.fold_seconds.labels("leaf").observe(secs)
        else:
            top = cmd.parent[0] == run.red.hier.depth - 1
            self.metrics.fold_seconds.labels("top" if top else "middle").observe(secs)
        self._advance(run)

    def _finalized(self, run: RoundRun) -> None:
        rnd = run.round
        now = self.clock.monotonic()
        self.load.round_finished(len(rnd.accepted), now - rnd.opened_mono)
        rnd.post_arrival_s = now - rnd.last_arrival
        rnd.state = State.DONE
        self.metrics.post_arrival.observe(rnd.post_arrival_s)
        self.metrics.round_duration.observe(now - rnd.opened_mono)
        self.metrics.rounds.labels("done").inc()
        log.info("round %d of job %s done: %d updates, total weight %g", rnd.id, quote(rnd.job),
                 len(rnd.accepted), rnd.total_weight)
        run.done_event.set()
        self.table.evict_old()

    def _maybe_release(self, run: RoundRun) -> None:
        """Give a finished round's accumulators back once no command still uses them."""
        if run.released or run.tasks_in_flight > 0 or not run.finished:
            return
        run.released = True
        fns = {id(f): f for f in run.workers.values()}
        self._release_accs(run)
        for index in list(run.workers):
            self.pool.unbind(run.workers.pop(index))
        for fn in fns.values():
            if run.round.id in fn.layouts:
                fn.layouts.discard(run.round.id)
                self._enqueue(fn, Task({"op": "forget", "segments": [], "layouts": [run.round.id]}, None))
        self.table.let_go_of_memory()

    # -- results --------------------------------------------------------------------------------
    @contextmanager
    def model(self, job: str, rid: int, initial: bool, wait_s: float,
              alive: Callable[[], bool] = lambda: True) -> Iterator[tuple[RoundRun, Segment]]:
        """Hold a round's result (or initial model) for reading; waits up to wait_s for the result,
        or until ``alive()`` turns false (the client went away: its thread is freed at once)."""
        with self._lock:
            run = self.get(job, rid)
            run.readers += 1
        try:
            yield run, (self.table.initial_of(run) if initial else self.table.result_of(run, wait_s, alive))
        finally:
            with self._lock:
                run.readers -= 1
                if run.readers == 0 and run.finished:
                    self.table.evict_old()   # what a reader kept alive may go now

    def rounds(self) -> list[Round]:
        with self._lock:
            return [r.round for r in self.table.all()]

    def workers(self) -> list[PooledFunction]:
        with self._lock:
            return list(self.pool.functions)

    # -- time --------------------------------------------------------------------------------------
    def tick(self) -> float | None:
        """One step of the control loop: deadlines, re-planning, autoscaling. Returns when the next
        is due: 50 ms while a round is open, 0.5 s while functions wait out their keep-alive, never
        (None) when nothing runs — an idle service burns no CPU. The ticker thread calls it; with a
        manual clock (``engine.clock``) a test or simulation calls it after advancing time."""
        with self._lock:
            for run in self.table.all():
                guarded(f"deadline of round {run.round.id}", self._tick_deadline, run)
                guarded(f"re-planning round {run.round.id}", self._replan, run)
            guarded("autoscaling", self._autoscale)
            if any(r.round.state == State.OPEN for r in self.table.all()):
                return 0.05
            return 0.5 if self.pool.functions else None

    def _tick_deadline(self, run: RoundRun) -> None:
        if run.round.state == State.OPEN and run.round.deadline_s:
            self._maybe_close(run, forced=False)

    def observation(self, now: float) -> Observation:
        """What the autoscaler sees: functions, arrival rate, backlog, leaves that hold a function."""
        runs = self.table.all()
        return Observation(self.pool.instances(), self.load.arrivals_per_s, sum(r.red.backlog() for r in runs),
                           sum(len(r.workers) for r in runs), self.load.service_rate)

    def _prestart_node(self) -> str | None:
        """Where a pre-started function is most useful: a node with open-round leaves still unbound."""
        if not self.multi_node:
            return "local"
        want: dict[str, int] = {}
        for r in self.table.all():
            if r.round.state == State.OPEN:
                for leaf in r.leaves:
                    if leaf.index not in r.workers and not leaf.lost:
                        want[leaf.node] = want.get(leaf.node, 0) + 1
        have: dict[str, int] = {}
        for f in self.pool.functions:
            if f.state() is InstanceState.IDLE:
                have[f.node] = have.get(f.node, 0) + 1
        short = [(want[n] - have.get(n, 0), n) for n in sorted(want) if want[n] > have.get(n, 0)]
        return max(short)[1] if short else None

    def _autoscale(self) -> None:
        """Execute the autoscaler's decision: pre-start functions for a rising load, stop idle ones."""
        now = self.clock.monotonic()
        self.load.tick(now)
        obs = self.observation(now)
        d = decide(self._scale_state, obs, now, self.policy)
        self._scale_state = d.state
        self.metrics.queue_depth.set(obs.queue_depth)
        if self._closing:
            return
        for _ in range(min(d.start, self.config.workers - len(self.pool.functions))):
            node = self._prestart_node()
            if node is None:
                break
            try:
                fn = self.pool.start(node)
            except LiflError as e:  # a pre-start is an optimisation: the next push starts one itself
                log.warning("pre-starting a function failed: %s", e.message)
                break
            fn.role = "idle"
        for wid in d.stop:
            fn = next((f for f in self.pool.functions if f.handle.id == wid), None)
            if fn is not None and fn.state() is InstanceState.IDLE:
                self.pool.stop(fn)

    # -- node loss (multi-node runtimes) -------------------------------------------------------------
    def node_lost(self, node: str) -> None:
        """The runtime lost a node (and with it that node's gateway, functions and shared memory)."""
        with self._lock:
            self._node_lost(node)

    def _node_lost(self, node: str) -> None:
        """What a node held is gone: its functions, the update slots its gateway filled and the
        partial sums of its leaves. Updates whose only copy was there are taken back from the
        round (their clients may push again, to another gateway, while it is open); everything
        already folded into an accumulator elsewhere is kept and re-reduced from there."""
        if node in self._lost_nodes:
            return
        self._lost_nodes.add(node)
        log.warning("node %s was lost with its functions and shared memory", node)
        self.metrics.nodes_lost.inc()
        for fn in [f for f in self.pool.functions if f.node == node]:
            for task in self.pool.remove(fn):
                if task.run is not None:
                    task.run.tasks_in_flight -= 1
        if hasattr(self.runtime, "forget_streams"):
            for job, rid, client in self.runtime.forget_streams(node):
                run = self.table.runs.get(rid)
                if run is not None:
                    run.round.abandon(client)
        for run in self.table.all():  # failing a round may evict finished ones: iterate a copy
            if not run.running or not run.red.lose(node):
                continue
            run.lost_nodes.add(node)
            for leaf in run.leaves:
                if leaf.lost:
                    run.workers.pop(leaf.index, None)   # its function went with the node
            self._try_rebuild(run)
            self._maybe_release(run)

    def _try_rebuild(self, run: RoundRun) -> None:
        """Rebuild the tree over the partial sums that survive (``Reduction.rebuild``) once quiet;
        take back the updates that are gone, and fail the round below its quorum."""
        r, red = run.round, run.red
        if not run.running:
            red.needs_rebuild = False
            return
        if not red.can_rebuild() or (r.state == State.AGGREGATING and run.tasks_in_flight > 0):
            return
        ranks = {n.name: i for i, n in enumerate(self._nodes())}
        loss = red.rebuild(red.hier.fan_in, rank=lambda leaf: ranks.get(leaf.node, 0))
        for c in loss.clients:
            w = r.accepted.pop(c, None)
            if w is not None:
                r.total_weight -= w
        self.metrics.updates_lost.inc(len(loss.clients))
        lost = sorted(run.lost_nodes)
        if loss.clients:
            r.detail = (f"{len(loss.clients)} update(s) lost with node(s) {', '.join(lost)}"
                        + ("; their clients may push again" if r.state == State.OPEN else ""))
        if not red.alive:
            self._fail(run, f"every leaf of round {r.id} was on lost node(s) {lost}")
        elif r.state == State.AGGREGATING and len(r.accepted) < r.quorum:
            self._fail(run, f"{len(loss.clients)} update(s) were lost with node(s) {lost}; "
                            f"{len(r.accepted)} left, below the quorum of {r.quorum}")
        elif r.state == State.OPEN:
            self._maybe_close(run, forced=False)
        else:
            self._advance(run)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for run in self.table.all():  # failing a round evicts finished ones: iterate a copy
                if run.running:
                    self._fail(run, "the server shut down")
        if self._ticker is not None:
            self._ticker.stop()
        self.runtime.close()
