"""Virtual time: a discrete-event model of one LIFL server driven by the REAL control plane.

The policies are not re-implemented here: each round's tree comes from the
engine's own ``TreeShaper`` (``control.planner.plan_elastic``/``plan_static``,
``replan`` on ticks, ``control.placement.place`` on several nodes) fed by the
engine's ``LoadEstimator``; updates are routed with ``planner.route_leaf``,
functions are bound with ``autoscaler.choose_function`` and started/stopped by
``autoscaler.decide`` on the dispatcher's tick (50 ms while a round is open,
0.5 s while functions wait out their keep-alive). What this module adds is the mechanism in virtual
time, with durations measured on this machine (``calibrate.Costs``):

* each node's gateway is one FIFO server taking ``push_s(bytes)`` per update,
  admitting a push only while an update slot (``shm_budget_mb / update size``)
  is free; a slot is freed when the fold that read it ends;
* a fold of k updates takes ``batch_seconds(update_s, k, fuse_speedup)`` plus one
  command's round trip (``command_s``, as do a partial fold and the finalize) on one
  of the node's fold cores (more functions than cores wait for a core);
* a cold start takes ``cold_start_s``; partial folds run after the round closes,
  a parent after its slowest child, then the top finalises;
* a round's own cost (opening it, handing the clients their work, pulling the
  result) is ``round_overhead_s``, paid before the first upload can land.

The engine's ablation settings change the mechanism, as they change the engine's:

* ``fold_when = "lazy"``: a leaf folds nothing until the round closes (its
  updates hold their slots meanwhile);
* ``reuse_functions = false``: every binding starts a fresh function (no warm
  pick, nothing started ahead by the autoscaler), a function stops once its
  round is done, and each parent and the top (a new role) is a fresh function
  too, started when its command is ready;
* ``update_transport = "pipe"``: each folded update's bytes first cross a socket
  from the gateway to the function (``pipe_s_per_byte`` on the function's core,
  ``pipe_cpu_per_byte`` of gateway CPU), so they also count as bytes moved.

The planner sees what the dispatcher would (its estimate of the fold time, the
arrival-rate average), not the true costs. Clients are rows of a trace: a
dormant client costs nothing but its row.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import ServerConfig
from ..control.autoscaler import choose_function, decide
from ..control.model import AutoscalerState, Instance, InstanceState, Node, Observation, ScalePolicy, machine_node
from ..control.planner import batch_seconds, route_leaf
from ..engine.load import LoadEstimator
from ..engine.shaping import Shape, TreeShaper
from ..layout import Layout, TensorSpec
from .calibrate import Costs
from .config import SimConfigError
from .events import EventLoop
from .gateways import Gateways
from .records import RoundRecord, VariantRecord, compact_timeline
from .workload import RoundPlan

log = logging.getLogger("lifl.sim.virtual")
MAX_BATCH = 16   # updates per fold command, as the dispatcher sends them


@dataclass
class _Inst:
    id: str
    node: str
    ready_at: float
    role: str = "idle"
    last_used: float = 0.0
    bindings: int = 0
    busy: bool = False

    def state(self, now: float) -> InstanceState:
        if now < self.ready_at:
            return InstanceState.COLD
        if self.busy:
            return InstanceState.BUSY
        return InstanceState.WARM if self.bindings else InstanceState.IDLE


@dataclass
class _Leaf:
    index: int
    node: str
    home: str
    inst: _Inst | None = None
    pending: int = 0
    folding: int = 0
    folded: int = 0
    done_t: float = 0.0


@dataclass
class _Round:
    plan_row: RoundPlan
    open_t: float
    to_report: int
    shape: Shape
    leaves: list[_Leaf]
    accepted: int = 0
    weight: float = 0.0
    last_accept_t: float = 0.0
    closed_t: float | None = None
    done: bool = False
    cursor: int = 0
    cold: int = 0
    warm: int = 0


class VirtualServer:
    """One variant's server in virtual time; ``run_round`` per round, in order."""

    def __init__(self, server: ServerConfig, costs: Costs, update_bytes: int, numel: int, *, nodes: int = 1,
                 cores_per_node: float = 0.0, tick_s: float = 0.05, layout: Layout | None = None):
        self.cfg, self.costs, self.nbytes, self.numel = server, costs, update_bytes, numel
        self.layout = layout or Layout.from_specs([TensorSpec("w", "float32", (numel,))])
        self.tick_s = tick_s
        self.lazy = server.fold_when == "lazy"
        self.reuse = server.reuse_functions
        self.pipe = server.update_transport == "pipe"
        self.pipe_bytes = 0
        budget = server.shm_budget_mb * 2**20
        machine = machine_node("local", server.workers, server.fold_cores, os.cpu_count() or 2, budget)
        if nodes == 1 and not cores_per_node:
            self.nodes = [machine]
        else:
            cores = cores_per_node or machine.cores
            self.nodes = [Node(f"node{i}" if nodes > 1 else "local", cores, 0, budget) for i in range(nodes)]
        self.names = [n.name for n in self.nodes]
        self.cores = {n.name: max(1, int(n.cores)) for n in self.nodes}
        self.loop = EventLoop(self.cores)
        slots = max(1, (server.shm_budget_mb * 2**20) // max(1, update_bytes))
        self.policy = ScalePolicy(keep_alive_s=server.keep_alive_s, min_instances=server.min_workers,
                                  max_instances=server.workers, stabilization_s=min(10.0, server.keep_alive_s))
        self.scale_state = AutoscalerState()
        self.insts: list[_Inst] = []
        self._ids = itertools.count(1)
        self.load = LoadEstimator()      # what the engine feeds the planner and the autoscaler
        self.shaper = TreeShaper(server, lambda: self.nodes)
        self.tick_pending = False
        self.round: _Round | None = None
        self.finished: _Round | None = None   # set when the current round's result exists
        # metrics
        self.cold_starts = self.warm_reuses = 0
        self.cpu = {"gateway": 0.0, "functions": 0.0}
        self.gateways = Gateways(self.loop, self.names, slots, costs.push_s(update_bytes),
                                 costs.push_cpu_s(update_bytes), self._accept, self.cpu)
        self.peak_leaves = 0
        self.timeline_t: list[float] = []
        self.timeline_alive: dict[str, list[int]] = {"leaf": [], "middle": [], "top": [], "idle": []}
        self.arrival_times: list[float] = []
        self.cross_node_bytes = 0
        self.replans = 0
        self.scale_downs = 0
        for _ in range(server.min_workers):
            self._spawn(self.names[0], 0.0)

    # -- events ------------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.loop.now

    @property
    def peak_slots(self) -> int:
        return self.gateways.peak_slots

    def _spawn(self, node: str, now: float) -> _Inst:
        inst = _Inst(f"fn-{next(self._ids)}", node, now + self.costs.cold_start_s, last_used=now)
        self.insts.append(inst)
        self.cold_starts += 1
        self.cpu["functions"] += self.costs.cold_start_s
        self.loop.at(inst.ready_at, self._fn_ready, inst)
        return inst

    def _fn_ready(self, inst: _Inst) -> None:
        if inst in self.insts:
            self._pump(inst)

    # -- the dispatcher's side ----------------------------------------------------------------------
    def _instances(self) -> tuple[Instance, ...]:
        return tuple(Instance(i.id, i.node, i.state(self.now), i.role, i.last_used) for i in self.insts)

    def _bind(self, run: _Round, leaf: _Leaf, role: str) -> None:
        same = [i for i in self.insts if i.node == leaf.node]
        can_start = len(self.insts) < self.cfg.workers and len(same) < self._cap(leaf.node)
        # no reuse: a fresh function unless the caps stop it (as the engine's pool chooses)
        known = self._instances() if self.reuse or not can_start else ()
        got = choose_function(known, leaf.node, role, can_start,
                              {i.id: i.bindings + i.busy for i in same})
        if got.how == "cold":
            inst = self._spawn(leaf.node, self.now)
            run.cold += 1
        else:
            inst = next(i for i in self.insts if i.id == got.instance)
            self.warm_reuses += 1
            run.warm += 1
        leaf.inst = inst
        inst.bindings += 1
        inst.role = role

    def _cap(self, node: str) -> int:
        return self.cfg.workers if len(self.nodes) == 1 else max(1, self.cores[node])

    def _accept(self, node: str, weight: float) -> None:
        run = self.round
        run.accepted += 1
        run.weight += weight
        run.last_accept_t = self.now
        self.load.arrived(node)
        self.arrival_times.append(self.now)
        cands = [lf for lf in run.leaves if lf.home == node] or run.leaves
        i = route_leaf([lf.pending for lf in cands], [lf.folding > 0 for lf in cands], run.cursor % len(cands))
        run.cursor = (i + 1) % len(cands)
        leaf = cands[i]
        leaf.pending += 1
        if leaf.inst is None:
            self._bind(run, leaf, "leaf")
        if run.accepted >= run.to_report:
            run.closed_t = self.now
            if self.lazy:   # the leaves may fold now
                for lf in run.leaves:
                    if lf.inst is not None:
                        self._pump(lf.inst)
        self._pump(leaf.inst)
        self._maybe_reduce(run)

    def _pump(self, inst: _Inst) -> None:
        if inst.busy or self.now < inst.ready_at or inst not in self.insts:
            return
        run = self.round
        if run is None or run.done or (self.lazy and run.closed_t is None):
            return
        for leaf in run.leaves:
            if leaf.inst is inst and leaf.pending and not leaf.folding:
                k = min(leaf.pending, MAX_BATCH)
                leaf.pending -= k
                leaf.folding = k
                inst.busy = True
                inst.role = "leaf"
                d = batch_seconds(self.costs.update_s, k, self.costs.fuse_speedup) + self.costs.command_s
                if self.pipe:   # the updates' bytes cross the function's socket first
                    moved = k * self.nbytes
                    d += moved * self.costs.pipe_s_per_byte
                    self.cpu["gateway"] += moved * self.costs.pipe_cpu_per_byte
                    self.pipe_bytes += moved
                self._core(inst.node, d, self._folded, inst, leaf, k, d)
                return

    def _core(self, node: str, d: float, fn: Callable, *args) -> None:
        self.cpu["functions"] += d
        self.loop.on_core(node, d, fn, *args)

    def _folded(self, inst: _Inst, leaf: _Leaf, k: int, d: float) -> None:
        inst.busy = False
        inst.last_used = self.now
        leaf.folding = 0
        leaf.folded += k
        leaf.done_t = self.now
        self.load.folded(d, k)
        self.gateways.free(leaf.home, k)
        self._pump(inst)
        self._maybe_reduce(self.round)

    def _maybe_reduce(self, run: _Round) -> None:
        """Once closed and every leaf is idle: partial folds up the tree, then the top finalises."""
        if run.closed_t is None or run.done or any(lf.pending or lf.folding for lf in run.leaves):
            return
        c, hier = self.costs, run.shape.hier
        done = [max(lf.done_t, run.closed_t) for lf in run.leaves]
        fresh = [lf.folded == 0 for lf in run.leaves]
        tree_cpu = 0.0
        fresh_fn = 0.0 if self.reuse else c.cold_start_s   # no reuse: a new role is a new function
        started = False                                      # the top's function (no reuse)
        for level in hier.levels[1:]:
            nd, nf = [], []
            for kids in level:
                full = [k for k in kids if not fresh[k]]
                t = max(done[k] for k in kids)
                extra = sum(1 for k in kids[1:] if not fresh[k])  # the host child is folded into
                if extra:
                    s = batch_seconds(c.partial_s, extra, c.fuse_speedup) + c.command_s
                    t += s + fresh_fn
                    tree_cpu += s
                    if not self.reuse:
                        self._fresh_function(run)
                        started = len(level) == 1
                nd.append(t)
                nf.append(not full)
            done, fresh = nd, nf
        top = run.leaves[hier.host(hier.depth - 1, 0)]
        if top.inst is not None:
            top.inst.role = "top"
        end = done[0] + c.finalize_s + c.command_s
        if not started and not self.reuse:   # the finalize is the top's role: a fresh function
            end += fresh_fn
            self._fresh_function(run)
        self.cpu["functions"] += tree_cpu + c.finalize_s + c.command_s
        run.done = True
        self.loop.at(end, self._round_done, run)

    def _fresh_function(self, run: _Round) -> None:
        """No reuse: a parent or the top starts a function of its own (it stops with the round)."""
        self.cold_starts += 1
        run.cold += 1
        self.cpu["functions"] += self.costs.cold_start_s

    def _round_done(self, run: _Round) -> None:
        self.finished = run
        self.load.round_finished(run.accepted, self.now - run.open_t)
        for lf in run.leaves:
            if lf.inst is not None:
                lf.inst.bindings -= 1
                if lf.inst.bindings == 0:
                    lf.inst.last_used = self.now
                    lf.inst.role = "idle"
                    if not self.reuse and lf.inst in self.insts:   # its role is done: it stops
                        self.insts.remove(lf.inst)

    # -- planning (the engine's shaper) --------------------------------------------------------------
    def _leaves(self, shape: Shape, have: int = 0) -> list[_Leaf]:
        if shape.placement is not None:
            self.cross_node_bytes += shape.placement.cross_node_bytes
        return [_Leaf(i, shape.nodes[i], shape.homes[i]) for i in range(have, len(shape.homes))]

    def _replan(self) -> None:
        run = self.round
        if run is None or run.closed_t is not None:
            return
        new = self.shaper.reshape(run.shape, run.plan_row.round, len(run.plan_row.clients), run.accepted,
                                  self.layout, 0.0, self.load, [lf.node for lf in run.leaves])
        if new is None:
            return
        run.leaves.extend(self._leaves(new, len(run.leaves)))
        run.shape = new
        self.replans += 1
        self.peak_leaves = max(self.peak_leaves, len(run.leaves))

    # -- the ticker and the autoscaler -------------------------------------------------------------------
    def _tick(self) -> None:
        self.tick_pending = False
        self.load.tick(self.now)
        self._replan()
        run = self.round
        depth = sum(lf.pending + lf.folding for lf in run.leaves) if run and not run.done else 0
        required = sum(1 for lf in run.leaves if lf.inst is not None) if run and not run.done else 0
        obs = Observation(self._instances(), self.load.arrivals_per_s, depth, required, self.load.service_rate)
        d = decide(self.scale_state, obs, self.now, self.policy)
        self.scale_state = d.state
        starts = d.start if self.reuse else 0   # no reuse: nothing is started ahead
        for _ in range(min(starts, self.cfg.workers - len(self.insts))):
            inst = self._spawn(self.names[0], self.now)
            inst.role = "idle"
        for wid in d.stop:
            inst = next((i for i in self.insts if i.id == wid), None)
            if inst is not None and inst.state(self.now) is InstanceState.IDLE:
                self.insts.remove(inst)
                self.scale_downs += 1
        counts = {k: 0 for k in self.timeline_alive}
        for i in self.insts:
            counts[i.role if i.role in counts else "idle"] += 1
        self.timeline_t.append(self.now)
        for k, v in counts.items():
            self.timeline_alive[k].append(v)
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        if self.tick_pending:
            return
        open_ = self.round is not None and not self.round.done
        period = self.tick_s if open_ else (0.5 if self.insts else None)
        if period is not None:
            self.tick_pending = True
            self.loop.at(self.now + period, self._tick)

    # -- rounds ---------------------------------------------------------------------------------------
    def run_round(self, row: RoundPlan, open_t: float) -> RoundRecord:
        """Simulate one round opened at ``open_t`` (>= the previous round's end); returns its record."""
        self.loop.advance_to(open_t)
        expected = len(row.clients)
        shape = self.shaper.shape(row.round, expected, self.layout, 0.0, self.load)
        leaves = self._leaves(shape)
        self.peak_leaves = max(self.peak_leaves, len(leaves))
        to_report = int(row.reports.sum())
        if self.lazy and to_report > self.gateways.slots_total * len(self.names):
            raise SimConfigError(f"fold_when = 'lazy' holds every update of a round until it closes: "
                                 f"{to_report} updates of {self.nbytes} bytes do not fit shm_budget_mb = "
                                 f"{self.cfg.shm_budget_mb} ({self.gateways.slots_total} slots per node)")
        run = _Round(row, open_t, to_report, shape, leaves)
        self.round = run
        self.finished = None
        ready = open_t + self.costs.round_overhead_s + row.ready_s[row.reports]
        wts = row.weights[row.reports]
        self.gateways.start_round(ready, wts)
        self._schedule_tick()
        while self.finished is None:
            if not self.loop.pending:
                raise RuntimeError("virtual time stalled: no event left and the round is not done")
            self.loop.step()
        end = self.now
        log.info("virtual round %d: %d updates, %d leaves, %.3f s (post-arrival %.4f s)", row.round, run.accepted,
                 len(run.leaves), end - open_t, end - run.last_accept_t)
        return RoundRecord(round=row.round, selected=expected, reported=run.accepted, available=row.available,
                           round_s=end - open_t, post_arrival_s=end - run.last_accept_t,
                           push_phase_s=run.last_accept_t - open_t, start_s=open_t, total_weight=run.weight,
                           cold_starts=run.cold, warm_reuses=run.warm, leaves=len(run.leaves),
                           refused={} if to_report == expected else {"dropped_out": expected - to_report})


    def memory_model_bytes(self) -> int:
        """Shared memory the platform would hold at peak: update slots, float64 sums, one result."""
        return self.peak_slots * self.nbytes + self.peak_leaves * self.numel * 8 + self.nbytes


def serverful_round(row: RoundPlan, open_t: float, costs: Costs, nbytes: int) -> tuple[RoundRecord, float, float]:
    """The collect-then-aggregate baseline in virtual time: one process receives every update (same
    gateway cost), holds them all, then runs Flower's ``aggregate`` over all of them at close.
    Returns (record, its CPU-seconds, bytes it holds at peak)."""
    if costs.flower_per_update_s is None:
        raise SimConfigError("the serverful baseline runs Flower's aggregate(): install lifl[sim] (flwr)")
    ready = np.sort(open_t + costs.round_overhead_s + row.ready_s[row.reports])
    push = costs.push_s(nbytes)
    t = open_t
    for r in ready:
        t = max(t, r) + push
    agg = len(ready) * costs.flower_per_update_s
    end = t + agg
    rec = RoundRecord(round=row.round, selected=len(row.clients), reported=len(ready), available=row.available,
                      round_s=end - open_t, post_arrival_s=agg, push_phase_s=t - open_t, start_s=open_t,
                      total_weight=float(row.weights[row.reports].sum()),
                      refused={} if len(ready) == len(row.clients) else {"dropped_out": len(row.clients) - len(ready)})
    return rec, len(ready) * costs.push_cpu_s(nbytes) + agg, len(ready) * nbytes


def run_virtual(rows: Callable[[int, float], RoundPlan], rounds: int, variant: str, server: ServerConfig,
                costs: Costs, nbytes: int, numel: int, *, nodes: int = 1, cores_per_node: float = 0.0,
                tick_s: float = 0.05, on_round: Callable[[RoundRecord], None] | None = None,
                layout: Layout | None = None) -> VariantRecord:
    """Every round of one variant; ``rows(round, t_open)`` selects each round's clients at its start."""
    rec = VariantRecord(mode="virtual", variant=variant, server=vars(server).copy(), update_bytes=nbytes)
    t = 0.0
    if variant == "serverful":
        peak = 0
        for r in range(1, rounds + 1):
            rr, cpu, held = serverful_round(rows(r, t), t, costs, nbytes)
            rec.rounds.append(rr)
            rec.cpu["gateway"] += cpu
            peak = max(peak, held)
            t += rr.round_s
            if on_round:
                on_round(rr)
        rec.peak_pss_bytes = peak
        rec.bytes_between_processes = nbytes * sum(r.reported for r in rec.rounds)
        return rec
    sim = VirtualServer(server, costs, nbytes, numel, nodes=nodes, cores_per_node=cores_per_node, tick_s=tick_s,
                        layout=layout)
    for r in range(1, rounds + 1):
        rr = sim.run_round(rows(r, t), t)
        rec.rounds.append(rr)
        t = sim.now
        if on_round:
            on_round(rr)
    rec.cpu.update(sim.cpu)
    rec.peak_pss_bytes = sim.memory_model_bytes()
    rec.counters = {"cold_starts": sim.cold_starts, "warm_reuses": sim.warm_reuses, "replans": sim.replans,
                    "scale_downs": sim.scale_downs}
    rec.timeline = compact_timeline(sim.timeline_t, sim.timeline_alive, sim.arrival_times)
    # client -> gateway once; the fold reads the slot in place (no copy between processes) unless no_shm
    rec.bytes_between_processes = nbytes * sum(r.reported for r in rec.rounds) + sim.pipe_bytes
    rec.bytes_between_nodes = sim.cross_node_bytes
    rec.notes.append("peak_pss_bytes is the modelled shared memory (slots + float64 sums + result)")
    return rec
