"""The scale executor: runs ``control.autoscaler``'s decisions — pre-start functions for a rising
load where ``prestart_node`` says they are most useful, stop the idle ones past keep-alive."""
from __future__ import annotations

import collections
import logging

from ..control.autoscaler import decide, prestart_node
from ..control.model import AutoscalerState, InstanceState, Observation, ScalePolicy
from ..errors import LiflError
from ..rounds import State
from ..runtime.base import Runtime
from .load import LoadEstimator
from .pool import FunctionPool
from .store import RoundTable

log = logging.getLogger("lifl.engine")


class ScaleExecutor:
    def __init__(self, config, runtime: Runtime, pool: FunctionPool, table: RoundTable, load: LoadEstimator,
                 metrics):
        self.config, self.runtime, self.pool, self.table, self.load, self.metrics = (
            config, runtime, pool, table, load, metrics)
        self.policy = ScalePolicy(keep_alive_s=config.keep_alive_s, min_instances=config.min_workers,
                                  max_instances=config.workers, stabilization_s=min(10.0, config.keep_alive_s))
        self._state = AutoscalerState()

    def observation(self) -> Observation:
        """What the autoscaler sees: functions, arrival rate, backlog, leaves that hold a function."""
        runs = [r for r in self.table.all() if r.red is not None]   # not a finished round restored from disk
        return Observation(self.pool.instances(), self.load.arrivals_per_s, sum(r.red.backlog() for r in runs),
                           sum(len(r.workers) for r in runs), self.load.service_rate)

    def _where(self) -> str | None:
        unbound: collections.Counter = collections.Counter(
            leaf.node for r in self.table.all() if r.round.state == State.OPEN
            for leaf in r.leaves if leaf.index not in r.workers and not leaf.lost)
        idle = collections.Counter(f.node for f in self.pool.functions if f.state() is InstanceState.IDLE)
        return prestart_node([n.name for n in self.runtime.node_models()], unbound, idle)

    def step(self, now: float, closing: bool) -> None:
        self.load.tick(now)
        obs = self.observation()
        d = decide(self._state, obs, now, self.policy)
        self._state = d.state
        self.metrics.queue_depth.set(obs.queue_depth)
        if closing:
            return
        starts = d.start if self.config.reuse_functions else 0   # no reuse: nothing is started ahead
        for _ in range(min(starts, self.config.workers - len(self.pool.functions))):
            node = self._where()
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
