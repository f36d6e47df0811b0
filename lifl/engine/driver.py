"""The round driver: turns each round's pure reduction into function commands and its replies
back into reduction state — binding functions to leaves and parents, closing, failing,
finalising, and letting go of what a finished round held.

It owns no lock: the engine's façade (``lifl.dispatcher``) calls it under its own. It never
blocks on I/O except where noted (``allocate`` runs outside the lock).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from .. import fold
from ..errors import LiflError, quote
from ..rounds import State
from ..runtime.base import Reply, Runtime
from .clock import Clock
from .load import LoadEstimator
from .pool import FunctionPool, PooledFunction
from .reduction import Command, Finalize, Fold, Reduction
from .shaping import Shape
from .store import Forget, LeafSegs, RoundRun, RoundTable, Task

log = logging.getLogger("lifl.engine")


def allocate(runtime: Runtime, shape: Shape, have: int, numel: int) -> list[LeafSegs]:
    """Accumulators (float64) and journals for the leaves a shape adds after the first ``have``.
    May block (another node's store answers over the network): call it outside the engine's
    lock. A failure frees what it made."""
    made: list[LeafSegs] = []
    try:
        for node in shape.nodes[have:]:
            store = runtime.store(node)
            acc = store.scratch(numel * 8)
            try:
                made.append(LeafSegs(acc, store.scratch(fold.journal_bytes(numel))))
            except BaseException:
                store.release_scratch(acc.name)
                raise
    except BaseException:
        free(runtime, made)
        raise
    return made


def free(runtime: Runtime, segs: list[LeafSegs]) -> None:
    for s in segs:
        for seg in (s.acc, s.journal):
            runtime.store_of(seg.name).release_scratch(seg.name)


class RoundDriver:
    def __init__(self, runtime: Runtime, arena, table: RoundTable, pool: FunctionPool, load: LoadEstimator,
                 metrics, clock: Clock, generations: Callable[[], int], lazy: bool = False, journal=None):
        """``lazy``: the ``fold_when = "lazy"`` ablation (leaves fold only once a round closes).
        ``journal``: durable mode's hook (``lifl.durable``), told of closes, failures and results."""
        from ..durable import NO_JOURNAL
        self.journal = journal or NO_JOURNAL
        self.runtime, self.arena, self.table, self.pool = runtime, arena, table, pool
        self.load, self.metrics, self.clock, self._gens, self.lazy = load, metrics, clock, generations, lazy

    # -- functions and commands -------------------------------------------------------------
    def release_slot(self, name: str) -> None:
        self.runtime.store_of(name).release_slot(name)

    def bind(self, run: RoundRun, index: int, role: str, fresh: PooledFunction | None = None) -> str:
        fn, how = self.pool.bind(run.red.leaves[index].node, role, fresh)
        run.workers[index] = fn
        return how

    def _bind_or_fail(self, run: RoundRun, index: int, role: str) -> bool:
        """Bind a parent's function; if none can start, the round fails with the reason."""
        try:
            self.bind(run, index, role)
            return True
        except LiflError as e:
            self.fail(run, f"no aggregator function for the {role} could start: {e.message}")
            return False

    def enqueue(self, fn: PooledFunction, task: Task) -> None:
        if task.run is not None:
            task.run.tasks_in_flight += 1
        self.pool.enqueue(fn, task)

    def forget(self, names: list[str]) -> None:
        """Tell every function to unmap segments the arena unlinked."""
        for fn in list(self.pool.functions):   # a retiring function leaves the pool when pumped
            if not fn.dead:
                self.enqueue(fn, Task(Forget(tuple(names)), None))

    def next_update_fold(self, fn: PooledFunction) -> Task | None:
        """An idle function's next work: a fold of pending updates of a leaf it carries."""
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

    def reply(self, fn: PooledFunction, reply: Reply) -> None:
        task = self.pool.finished(fn)
        if task is not None:
            run = task.run
            if run is not None:
                run.tasks_in_flight -= 1
            if not reply.ok:
                if reply.lost_input and run is not None and run.lost_nodes and task.reads_partials:
                    # a child's partial went down with its node: the rebuild re-reduces
                    run.red.abandon(task.cmd, torn=task.attempts > 1)
                else:
                    self.fail(run, f"aggregator function {fn.handle.id} failed: {reply.error}")
            elif run is not None and isinstance(task.cmd, (Fold, Finalize)):
                fn.folds += 1
                self._committed(run, fn, task.cmd, reply.seconds)
            if run is not None:
                if run.red.needs_rebuild:
                    self.try_rebuild(run)
                self.maybe_release(run)
        self.pool.pump(fn)

    # -- a round's life -----------------------------------------------------------------------
    def install(self, run: RoundRun, shape: Shape, segs: list[LeafSegs]) -> None:
        """Adopt a shape whose new leaves' segments were allocated (``allocate``)."""
        new = list(zip(shape.nodes, shape.homes))[len(run.segs):]
        run.segs.extend(segs)
        if run.red is None:
            run.red = Reduction(run.round.id, shape.hier, new, self._gens, lazy=self.lazy,
                                numel=run.round.layout.numel, flat_on=self.runtime.head)
        else:
            run.red.extend(shape.hier, new)
        run.shape = shape

    def release_accs(self, run: RoundRun) -> None:
        lost = run.lost_nodes
        free(self.runtime, [s for i, s in enumerate(run.segs)
                            if run.red is None or run.red.leaves[i].node not in lost])  # those went with their node

    def maybe_close(self, run: RoundRun, forced: bool) -> None:
        to = run.round.decide_close(self.clock.monotonic(), forced)
        if to is None:
            return
        detail = run.round.close_detail(forced)
        if to == State.FAILED:
            self.fail(run, detail)
            return
        run.round.close(State.AGGREGATING, detail, self.clock.time())
        self.journal.closed(run.round)
        run.red.close()
        self.advance(run)
        if self.lazy:   # the leaves' updates may be folded now
            for fn in {id(f): f for f in run.workers.values()}.values():
                self.pool.pump(fn)

    def fail(self, run: RoundRun | None, detail: str) -> None:
        if run is None or run.finished:
            return
        run.round.close(State.FAILED, detail, self.clock.time())
        self.journal.failed(run.round)
        log.warning("round %d of job %s failed: %s", run.round.id, quote(run.round.job), detail)
        self.metrics.rounds.labels("failed").inc()
        for name in run.red.drain_pending():
            self.release_slot(name)
        run.parked = []
        run.finish()
        self.maybe_release(run)
        self._release_next(run)
        self.table.evict_old()

    def advance(self, run: RoundRun) -> None:
        """Start what the reduction says may start: parents' partial folds, then the finalize."""
        if run.round.state != State.AGGREGATING:
            return
        for cmd in run.red.ready():
            role = "top" if isinstance(cmd, Finalize) or cmd.parent[0] == run.red.hier.depth - 1 else "middle"
            if not self.pool.reuse and cmd.leaf in run.workers and run.workers[cmd.leaf].role != role:
                self.pool.unbind(run.workers.pop(cmd.leaf))   # no reuse: a new role, a new function
            if cmd.leaf not in run.workers and not self._bind_or_fail(run, cmd.leaf, role):
                return
            fn = run.workers[cmd.leaf]
            if cmd.children and fn.role != role:
                self.metrics.warm_reuses.inc()  # a finished leaf takes a parent's role
            fn.role = role
            if isinstance(cmd, Finalize) and run.result is None:
                run.result = self.arena.result_segment(run.round.layout.total_size)
                if run.step is not None and "t" not in run.step:   # re-sends keep the step they follow
                    run.step["t"] = int(self.arena.get(run.step["state"]).array(np.uint64, 1)[0])
            if isinstance(cmd, Finalize) and self._behind(run):
                run.parked.append(cmd)   # its step follows the previous buffer's: sent once that one is done
                log.debug("round %d's finalize waits for round %d's server step", run.round.id, run.step["after"])
                continue
            self.enqueue(fn, Task(cmd, run))

    def _behind(self, run: RoundRun) -> bool:
        """True while the round whose step this round's step follows (``step["after"]``: the
        previous buffer of an asynchronous job) has not finished."""
        after = (run.step or {}).get("after")
        prev = self.table.runs.get(after) if after else None
        return prev is not None and not prev.finished

    def _release_next(self, run: RoundRun) -> None:
        """``run`` finished: send the finalize that waited for it, or fail that round if ``run``
        failed (its step would read a master copy that was never written)."""
        for nxt in self.table.all():
            if not nxt.parked or (nxt.step or {}).get("after") != run.round.id:
                continue
            cmds, nxt.parked = nxt.parked, []
            if run.round.state == State.FAILED:
                self.fail(nxt, f"round {run.round.id}, whose server step this one follows, failed")
                continue
            for cmd in cmds:
                self.enqueue(nxt.workers[cmd.leaf], Task(cmd, nxt))

    def _committed(self, run: RoundRun, fn: PooledFunction, cmd: Command, secs: float) -> None:
        """A function finished a command: commit it to the reduction, free what it read, go on."""
        for name in run.red.commit(cmd):
            self.release_slot(name)
        if isinstance(cmd, Finalize):
            self.metrics.fold_seconds.labels("top").observe(secs)
            if run.red.done:   # a flat finalize is done when its last span is
                fn.updates_folded += len(cmd.updates)
                self._finalized(run)
            return
        if cmd.updates:
            fn.updates_folded += len(cmd.updates)
            self.load.folded(secs, len(cmd.updates))
            self.metrics.fold_seconds.labels("leaf").observe(secs)
        else:
            top = cmd.parent[0] == run.red.hier.depth - 1
            self.metrics.fold_seconds.labels("top" if top else "middle").observe(secs)
        self.advance(run)

    def _finalized(self, run: RoundRun) -> None:
        rnd = run.round
        now = self.clock.monotonic()
        self.load.round_finished(len(rnd.accepted), now - rnd.opened_mono)
        rnd.post_arrival_s = now - rnd.last_arrival
        self.journal.finalized(run)   # the result is on disk before anyone is told it exists
        rnd.state = State.DONE
        self.metrics.post_arrival.observe(rnd.post_arrival_s)
        self.metrics.round_duration.observe(now - rnd.opened_mono)
        self.metrics.rounds.labels("done").inc()
        log.info("round %d of job %s done: %d updates, total weight %g", rnd.id, quote(rnd.job),
                 len(rnd.accepted), rnd.total_weight)
        run.finish()
        self._release_next(run)
        self.table.evict_old()

    def maybe_release(self, run: RoundRun) -> None:
        """Give a finished round's accumulators back once no command still uses them."""
        if run.released or run.tasks_in_flight > 0 or not run.finished:
            return
        run.released = True
        fns = {id(f): f for f in run.workers.values()}
        self.release_accs(run)
        for index in list(run.workers):
            self.pool.unbind(run.workers.pop(index))
        for fn in fns.values():
            if run.round.id in fn.layouts and fn in self.pool.functions:
                fn.layouts.discard(run.round.id)
                self.enqueue(fn, Task(Forget(layouts=(run.round.id,)), None))
        self.table.let_go_of_memory()

    def try_rebuild(self, run: RoundRun) -> None:
        """Rebuild the tree over the partial sums that survive (``Reduction.rebuild``) once quiet;
        take back the updates that are gone, and fail the round below its quorum."""
        r, red = run.round, run.red
        if not run.running:
            red.needs_rebuild = False
            return
        if not red.can_rebuild() or (r.state == State.AGGREGATING and run.tasks_in_flight > 0):
            return
        ranks = {n.name: i for i, n in enumerate(self.runtime.node_models())}
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
            self.fail(run, f"every leaf of round {r.id} was on lost node(s) {lost}")
        elif r.state == State.AGGREGATING and len(r.accepted) < r.quorum:
            self.fail(run, f"{len(loss.clients)} update(s) were lost with node(s) {lost}; "
                           f"{len(r.accepted)} left, below the quorum of {r.quorum}")
        elif r.state == State.OPEN:
            self.maybe_close(run, forced=False)
        else:
            self.advance(run)
