"""Recovery: what the engine does when a function dies or a node is lost.

A function that dies is replaced and its unfinished commands re-sent to the replacement,
exactly once each (the reduction's journal makes a re-sent fold resume, never fold twice). A
lost node takes its functions, the update slots its gateway filled and its leaves' partial
sums with it: updates whose only copy was there are taken back from the round (their clients
may push again while it is open), and the tree is rebuilt over what survives elsewhere.
"""
from __future__ import annotations

import logging

from ..control.model import InstanceState
from ..errors import LiflError
from ..rounds import State
from ..runtime.base import Runtime
from .driver import RoundDriver
from .pool import FunctionPool, PooledFunction
from .store import RoundTable

log = logging.getLogger("lifl.engine")


class Recovery:
    def __init__(self, runtime: Runtime, pool: FunctionPool, table: RoundTable, driver: RoundDriver, metrics):
        self.runtime, self.pool, self.table, self.driver, self.metrics = runtime, pool, table, driver, metrics
        self.lost_nodes: set[str] = set()
        self.closing = False      # the engine is shutting down: deaths are expected, nothing is replaced

    def function_died(self, fn: PooledFunction) -> None:
        """Start a replacement, hand it the dead function's leaves, and re-send its unfinished commands.

        Safe because commands never modify their inputs (a fold re-sent resumes from its
        journal, finalize writes the result) and update slots are released only when the fold
        that read them is committed: nothing is folded twice."""
        if not self.runtime.node_alive(fn.node):
            self.node_lost(fn.node)  # the whole node went: its leaves' sums went with it
            return
        idle = not fn.bindings and fn.current is None and not fn.queue
        tasks = self.pool.remove(fn)
        if self.closing:
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
                    self.driver.fail(run, f"aggregator function {fn.handle.id} died and no replacement "
                                          f"started: {e.message}")
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
                    self.driver.maybe_release(task.run)
                continue
            task.attempts += 1
            repl.queue.append(task)
            self.metrics.tasks_retried.inc()
        self.pool.pump(repl)

    def node_lost(self, node: str) -> None:
        """What a node held is gone: its functions, the update slots its gateway filled and the
        partial sums of its leaves; everything already folded into an accumulator elsewhere is
        kept and re-reduced from there."""
        if node in self.lost_nodes:
            return
        self.lost_nodes.add(node)
        busy = any(f.node == node and f.state() is not InstanceState.IDLE for f in self.pool.functions)
        held = any(run.running and any(lf.node == node and not lf.lost for lf in run.leaves)
                   for run in self.table.all())
        if not busy and not held:   # e.g. an autoscaler removed it once it was idle
            log.info("node %s left the cluster; it held no work", node)
            self.metrics.nodes_left.inc()
        else:
            log.warning("node %s was lost with its functions and shared memory", node)
            self.metrics.nodes_lost.inc()
        for fn in [f for f in self.pool.functions if f.node == node]:
            for task in self.pool.remove(fn):
                if task.run is not None:
                    task.run.tasks_in_flight -= 1
        for job, rid, client in self.runtime.events.open_streams(node):
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
            self.driver.try_rebuild(run)
            self.driver.maybe_release(run)
