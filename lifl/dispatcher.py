"""The dispatcher: turns descriptor events and policy decisions into function commands.

Payloads stay where the gateway wrote them (shared-memory slots); only
descriptors (slot name, weight) move. Each update is routed to a leaf as soon
as it is complete (eager aggregation); a function that is busy gets every
update that queued up meanwhile in one fused fold. When a round closes, each
parent folds its children's partial sums as soon as they are complete, and the
top finalises Σwᵢxᵢ/Σwᵢ into a result segment that Pull serves.

Functions are serverless: none runs until an update needs one (a leaf is
bound to a function when its first update arrives, preferring an idle warm
function over a cold start), a function whose leaves are done serves the next
role (a parent's partial folds, the next round's leaves), and idle functions
are stopped after the keep-alive — down to zero. When to start and stop is
decided by ``control.autoscaler`` and the tree's shape by ``control.planner``
(pure policies); this module only executes their decisions through a runtime.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .config import ServerConfig
from .control.autoscaler import decide
from .control.model import (AutoscalerState, FoldCosts, Instance, InstanceState, Load, Node, Observation,
                            PlannerPolicy, Resources, ScalePolicy)
from .control.placement import place, random_placement
from .control.planner import Hierarchy, build_tree, plan_elastic, plan_static, replan, route_leaf
from . import fold
from .errors import LiflError, quote
from .layout import Layout
from .metrics import Metrics
from .rounds import Round, State, job_name
from .shm import Arena, Segment

MAX_BATCH = 16  # updates per fold command
START_ATTEMPTS = 3  # a function that dies while starting is retried this often before anything fails

log = logging.getLogger("lifl.dispatcher")


@dataclass
class LeafRun:
    """A leaf's state. Its float64 partial sum lives in one accumulator that folds update
    in place, piece by piece, with a journal beside it (``fold.Journal``): every fold takes
    it to a new generation, and only the reply commits that generation here, so a
    function killed mid-fold is simply sent the same command again and nothing is
    folded twice."""

    index: int
    worker: "WorkerSlot | None"   # bound when the leaf's first work arrives
    acc: Segment
    journal: Segment
    node: str = "local"            # where its function and accumulators are (the placement's choice)
    home: str = "local"            # whose gateway feeds it
    gen: int = 0                   # generation of the committed sum (0: nothing folded, logically zero)
    next_gen: int = 0              # generation the fold in flight writes
    pending: list[tuple[str, float]] = field(default_factory=list)
    folding: int = 0
    folded: int = 0
    clients: list[str] = field(default_factory=list)   # whose updates were routed here
    contains: set[int] = field(default_factory=set)    # leaves whose updates this accumulator holds
    lost: bool = False             # its node is gone, and with it what it held

    @property
    def fresh(self) -> bool:
        """Nothing folded yet: the sum is logically zero."""
        return self.gen == 0

    def commit(self) -> None:
        self.gen = self.next_gen

    def fold_cmd(self, run_id: int, gen: int, **inputs) -> dict:
        """A fold taking the accumulator from its committed generation (or zero) to ``gen``."""
        self.next_gen = gen
        cmd = {"op": "fold", "layout": run_id, "acc": self.acc.name, "journal": self.journal.name,
               "gen": gen, **inputs}
        if self.gen:
            cmd["from"] = self.gen
        return cmd


@dataclass
class RoundRun:
    round: Round
    hier: Hierarchy
    leaves: list[LeafRun]
    initial: Segment | None = None
    result: Segment | None = None      # allocated when the top finalises
    from_round: int = 0                # initial is that round's result (shared, not copied)
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
    plan: object = None        # the elastic planner's Plan (None for a static tree)
    placement: object = None   # where leaves and parents run (multi-node runtimes)
    lost_nodes: set[str] = field(default_factory=set)
    needs_rebuild: bool = False    # a node was lost while aggregating: re-reduce once quiet


@dataclass
class Task:
    cmd: dict
    run: RoundRun | None
    on_done: Callable[[dict], None] | None = None
    kind: str = "control"      # "update" | "partial" | "finalize" | "control"


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
        self.bindings = 0                      # leaves of unfinished rounds it carries
        self.idle_since = time.monotonic()
        self.node = getattr(handle, "node", "local")

    def state(self) -> InstanceState:
        if self.current is not None or self.queue:
            return InstanceState.BUSY
        return InstanceState.WARM if self.bindings else InstanceState.IDLE


def _wait(event: threading.Event, timeout: float, alive: Callable[[], bool], step: float = 0.5) -> bool:
    """``event.wait(timeout)`` in slices, giving up early when ``alive()`` is false."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if event.wait(min(step, max(0.0, left))):
            return True
        if left <= step or not alive():
            return event.is_set()


class Dispatcher:
    def __init__(self, config: ServerConfig, arena: Arena, runtime, metrics: Metrics):
        self.config, self.arena, self.runtime, self.metrics = config, arena, runtime, metrics
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._round_ids = itertools.count(1)
        self._gens = itertools.count(1)     # accumulator generations: never reused (fold.Journal)
        self._runs: dict[int, RoundRun] = {}
        self._workers: list[WorkerSlot] = []
        self._closing = False
        self.policy = ScalePolicy(keep_alive_s=config.keep_alive_s, min_instances=config.min_workers,
                                  max_instances=config.workers, stabilization_s=min(10.0, config.keep_alive_s))
        self._scale_state = AutoscalerState()
        self._arrivals = 0.0            # EWMA of accepted updates per second
        self._last_tick = time.monotonic()
        self._accepted_since_tick = 0
        self._fold_s = 0.0              # EWMA of one leaf fold, for the service rate
        self._last_round_rate = 0.0     # arrival rate seen in the last finished round
        self.last_plan = ""
        # a multi-node runtime (Ray) describes its nodes and stores; the local one has one of each
        self.multi_node = hasattr(runtime, "node_models")
        self._node_arrivals: collections.Counter[str] = collections.Counter()
        self._last_node_share: dict[str, float] = {}
        self._lost_nodes: set[str] = set()
        if self.multi_node:
            runtime.on_node_lost = self.node_lost
        if hasattr(runtime, "prepare"):
            runtime.prepare()
        for _ in range(config.min_workers):
            self._spawn()
        self._ticker = threading.Thread(target=self._tick_loop, name="lifl-deadlines", daemon=True)
        self._stop = False
        self._wake = threading.Event()   # a round opened (or shutdown): the ticker has work again
        self._ticker.start()

    # -- functions -----------------------------------------------------------
    def _spawn(self, node: str | None = None) -> WorkerSlot:
        """Start a function, retrying one that dies while it starts (``START_ATTEMPTS`` in all);
        when none can start, UNAVAILABLE with the last reason (nothing was changed)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                handle = self.runtime.start_worker(self._on_message, node=node)
                break
            except Exception as e:
                self.metrics.function_failures.inc()
                log.warning("aggregator function start %d/%d failed: %s", attempt, START_ATTEMPTS, e)
                if attempt == START_ATTEMPTS:
                    raise LiflError("UNAVAILABLE", f"no aggregator function could start ({START_ATTEMPTS} "
                                                   f"attempts; last: {e}); retry later") from e
        slot = WorkerSlot(handle)
        self._workers.append(slot)
        self.metrics.cold_starts.inc()
        if not getattr(handle, "async_start", False):  # a Ray actor reports it once it is up
            self.metrics.cold_start_seconds.observe(getattr(handle, "start_seconds", 0.0))
        return slot

    # -- nodes and their shared memory ---------------------------------------------
    def _store(self, node: str):
        """Where a node's segments are made and given back (the runtime's, or this server's arena)."""
        return self.runtime.store(node) if self.multi_node else self.arena

    def _release_slot(self, name: str) -> None:
        (self.runtime.store_of(name) if self.multi_node else self.arena).release_slot(name)

    def _node_cap(self, node: str) -> int:
        """Functions that may run on a node at once."""
        if not self.multi_node:
            return self.config.workers
        cores = next((n.cores for n in self.runtime.node_models() if n.name == node), 0.0)
        return max(1, int(cores // self.config.function_cpus))

    def _bind(self, leaf: LeafRun, role: str) -> str:
        """Give a leaf a function on its node: an idle warm one, else a cold start, else the least loaded."""
        same = [w for w in self._workers if w.node == leaf.node]
        idle = [w for w in same if w.state() is InstanceState.IDLE]
        if idle:
            w, how = max(idle, key=lambda w: w.idle_since), "warm"
            self.metrics.warm_reuses.inc()
        elif not same or (len(self._workers) < self.config.workers and len(same) < self._node_cap(leaf.node)):
            w, how = self._spawn(None if not self.multi_node else leaf.node), "cold"
        else:
            w, how = min(same, key=lambda w: (w.bindings, len(w.queue))), "shared"
            self.metrics.warm_reuses.inc()
        leaf.worker = w
        w.bindings += 1
        w.role = role
        return how

    def _unbind(self, leaf: LeafRun) -> None:
        w, leaf.worker = leaf.worker, None
        if w is not None:
            w.bindings -= 1
            if w.bindings == 0:
                w.idle_since = time.monotonic()

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
                    return Task(leaf.fold_cmd(run.round.id, next(self._gens), updates=[[n, wt] for n, wt in batch]), run,
                                lambda r, run=run, leaf=leaf, batch=batch: self._leaf_folded(run, leaf, batch, r),
                                kind="update")
        return None

    def _on_message(self, handle, msg: dict | None) -> None:
        """A function's reply (or its exit, ``msg is None``), from the runtime's reader thread.
        An error here is logged and fails only the round the reply belongs to: the reader
        thread must go on reading (an exception reaching it would look like the function dying)."""
        with self._lock:
            w = self._slot_of(handle)
            if w is None:
                return
            task = w.current
            try:
                self._handle_message(w, handle, msg)
            except Exception as e:
                eid = os.urandom(4).hex()
                log.exception("error %s handling %s from function %s", eid, "its exit" if msg is None else "a reply",
                              getattr(handle, "id", "?"))
                if task is not None:
                    self._fail(task.run, f"internal error {eid} handling a function's reply: {e}")

    def _handle_message(self, w: WorkerSlot, handle, msg: dict | None) -> None:
        if msg is None:
            self._worker_died(w)
            return
        task, w.current = w.current, None
        if task is not None:
            run = task.run
            if run is not None:
                run.tasks_in_flight -= 1
            if not msg.get("ok"):
                if msg.get("lost_input") and run is not None and run.lost_nodes and task.kind == "partial":
                    pass  # a child's partial went down with its node: the rebuild re-reduces
                else:
                    self._fail(run, f"aggregator function {handle.id} failed: {msg.get('error')}")
            elif task.on_done is not None:
                w.folds += 1
                task.on_done(msg)
            if run is not None:
                if run.needs_rebuild:
                    self._try_rebuild(run)
                self._maybe_release(run)
        self._pump(w)

    def _worker_died(self, w: WorkerSlot) -> None:
        """Start a replacement, hand it the dead function's leaves, and re-run its unfinished commands.

        Safe because commands never modify their inputs (a fold re-sent resumes from its
        journal, finalize writes the result) and update slots are released
        only when the fold that read them is committed: nothing is folded twice.
        """
        if self.multi_node and not self.runtime.node_alive(w.node):
            self._node_lost(w.node)  # the whole node went: its leaves' sums went with it
            return
        w.dead = True
        self._workers.remove(w)
        if self._closing:
            return
        self.metrics.function_failures.inc()
        if not w.bindings and w.current is None and not w.queue:
            return  # an idle function: nothing to recover, nothing to replace (serverless)
        log.warning("aggregator function %s died while it had work; starting a replacement", w.handle.id)
        try:
            repl = self._spawn(w.node if self.multi_node else None)
        except Exception as e:  # cannot even restart: fail what depended on it
            log.error("no replacement for function %s: %s", w.handle.id, e)
            for run in list(self._runs.values()):
                if any(leaf.worker is w for leaf in run.leaves):
                    self._fail(run, f"aggregator function {w.handle.id} died and no replacement started: {e}")
            return
        for run in self._runs.values():
            for leaf in run.leaves:
                if leaf.worker is w:
                    leaf.worker = repl
                    repl.bindings += 1
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
                   initial: Segment | None, from_round: int = 0) -> Round:
        quorum = Round.check_params(expected, quorum, deadline_s)
        job = job_name(job)
        with self._lock:
            if self._closing:
                raise LiflError("UNAVAILABLE", "the server is shutting down")
            rid = next(self._round_ids)
            rnd = Round(job, rid, layout, expected, quorum, deadline_s)
            run = RoundRun(rnd, None, [], initial=initial, from_round=from_round)
            try:
                self._shape(run)
            except BaseException:
                self._release_accs(run)
                raise
            self._runs[rid] = run
            self._wake.set()
            return rnd

    def _shape(self, run: RoundRun) -> None:
        """Plan the round's tree (elastic or static), place it on nodes, and allocate its leaves."""
        r = run.round
        plan = self._plan(r.expected, r.layout, r.deadline_s)
        if not self.multi_node:
            run.plan = plan
            run.hier = plan.hierarchy if plan is not None else plan_static(
                min(self.config.leaves, self.config.workers, r.expected), self.config.fan_in)
            self._add_leaves(run, ["local"] * run.hier.leaves, ["local"] * run.hier.leaves)
            return
        if plan is None:  # static: config.leaves per node, the nodes' leaves grouped together
            names = [n.name for n in self._nodes()]
            home = [n for n in names for _ in range(self.config.leaves)][:max(len(names), r.expected)]
            hier = build_tree(sorted(range(len(home)), key=lambda i: (names.index(home[i]), i)),
                              self.config.fan_in)
        else:
            home, hier = list(plan.leaf_home), plan.hierarchy
        run.plan = plan
        run.placement = self._place(hier, home, r.layout, r.expected, r.id)
        run.hier = run.placement.hierarchy
        self._add_leaves(run, home, list(run.placement.leaf_node))
        self.last_plan = (f"{run.hier.describe()} on {', '.join(f'{n}:{c}' for n, c in self._per_node(run))}"
                          f"; {run.placement.partial_bytes_crossing + run.placement.update_bytes_crossing} "
                          f"bytes to cross nodes")

    def _place(self, hier: Hierarchy, home: list[str], layout: Layout, expected: int, seed: int):
        """Where each leaf and parent runs: locality-aware (``control.placement``), or random (a baseline)."""
        nodes = self._nodes()
        per_leaf = layout.total_size * max(1, round(expected / len(home)))
        if self.config.placement == "random":
            return random_placement(hier, home, nodes, seed, leaf_update_bytes=per_leaf,
                                    partial_bytes=layout.numel * 8)
        return place(hier, home, nodes, Resources(cores=self.config.function_cpus),
                     leaf_update_bytes=per_leaf, partial_bytes=layout.numel * 8)

    @staticmethod
    def _per_node(run: RoundRun) -> list[tuple[str, int]]:
        return sorted(collections.Counter(leaf.node for leaf in run.leaves).items())

    def _add_leaves(self, run: RoundRun, homes: list[str], nodes: list[str]) -> None:
        numel = run.round.layout.numel
        for home, node in list(zip(homes, nodes))[len(run.leaves):]:
            store = self._store(node)
            run.leaves.append(LeafRun(len(run.leaves), None, store.scratch(numel * 8),
                                      store.scratch(fold.journal_bytes(numel)), node=node, home=home))

    def _release_accs(self, run: RoundRun) -> None:
        for leaf in run.leaves:
            if not leaf.lost:
                store = self._store(leaf.node)
                for seg in (leaf.acc, leaf.journal):
                    store.release_scratch(seg.name)

    def _nodes(self) -> list[Node]:
        """The nodes functions may run on (alive ones), as the policies see them."""
        if self.multi_node:
            return [n for n in self.runtime.node_models() if n.name not in self._lost_nodes]
        # cores left for folding: the gateway's gRPC threads need about one of this machine's cores
        cores = float(min(self.config.workers, self.config.fold_cores or max(1, (os.cpu_count() or 2) - 1)))
        return [Node("local", cores, 0, self.arena.budget)]

    def _plan_inputs(self, expected: int, layout: Layout, deadline_s: float):
        update_s = self._fold_s or layout.total_size / 2e9  # before any measurement: ~2 GB/s
        costs = FoldCosts(update_s=update_s, fuse_speedup=2.0, partial_s=2 * update_s, finalize_s=update_s)
        rate = self._arrivals or self._last_round_rate or expected / (deadline_s or 10.0)
        nodes = self._nodes()
        if self.multi_node:  # leaves up to config.leaves per node; arrivals split as last round's were
            share = {n: v for n, v in self._last_node_share.items() if n in {m.name for m in nodes}}
            policy = PlannerPolicy(max_leaves=min(self.config.leaves * len(nodes), expected))
            return Load(expected, rate, share), costs, nodes, policy
        policy = PlannerPolicy(max_leaves=min(self.config.leaves, self.config.workers, expected))
        return Load(expected, rate), costs, nodes, policy

    def _plan(self, expected: int, layout: Layout, deadline_s: float):
        """The elastic planner's plan from measured costs, or None for the configured static tree."""
        if self.config.planner == "static":
            return None
        load, costs, nodes, policy = self._plan_inputs(expected, layout, deadline_s)
        demand = Resources(cores=self.config.function_cpus if self.multi_node else 1.0)
        plan = plan_elastic(load, costs, nodes, demand, policy=policy)
        self.last_plan = plan.hierarchy.describe()
        return plan

    def _replan(self, run: RoundRun) -> None:
        """Mid-round: adopt a new plan when the measured arrival rate makes it worth it.

        Existing leaves keep their index (their partial sums stay valid); new ones are
        appended and the tree above the leaves is rebuilt, which is safe while the
        round is open because parents only start folding after it closes."""
        if run.plan is None or run.round.state != State.OPEN or not self._arrivals:
            return
        r = run.round
        load, costs, nodes, policy = self._plan_inputs(r.expected, r.layout, r.deadline_s)
        load = Load(r.expected, self._arrivals, load.node_share)
        demand = Resources(cores=self.config.function_cpus if self.multi_node else 1.0)
        new = replan(run.plan, load, costs, nodes, demand, policy=policy, received=len(r.accepted))
        if new is run.plan:
            return
        home = list(new.leaf_home)
        if self.multi_node:
            placement = self._place(new.hierarchy, home, r.layout, r.expected, r.id)
            if any(placement.leaf_node[leaf.index] != leaf.node for leaf in run.leaves):
                return  # it would move leaves that already hold sums: keep the current plan
            run.placement, run.hier = placement, placement.hierarchy
            nodes_of = list(placement.leaf_node)
        else:
            run.hier, nodes_of = new.hierarchy, home
        run.plan = new
        self._add_leaves(run, home, nodes_of)
        self.metrics.replans.inc()
        self.last_plan = new.hierarchy.describe() + " (re-planned mid-round)"

    def get(self, job: str, rid: int) -> RoundRun:
        """A round of a job; an empty job is ``default`` (never "any job")."""
        job = job_name(job)
        run = self._runs.get(rid)
        if run is None or run.round.job != job:
            raise LiflError("NOT_FOUND", f"round {rid} of job {quote(job)} does not exist on this server")
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

    def accept(self, run: RoundRun, client: str, slot: str, weight: float, node: str = "") -> int:
        """Record a complete update (in ``slot`` on ``node``) and route it to a leaf fed by that
        node's gateway; returns the round's accepted count."""
        t_event = time.perf_counter()
        with self._lock:
            node = node or (self.runtime.head if self.multi_node else "local")
            run.round.check_accept(weight)
            cands = ([leaf for leaf in run.leaves if leaf.home == node and not leaf.lost]
                     or [leaf for leaf in run.leaves if not leaf.lost])
            i = route_leaf([len(leaf.pending) for leaf in cands], [leaf.folding > 0 for leaf in cands],
                           run.cursor % len(cands))
            leaf = cands[i]
            # a function for the leaf first: if none can start, nothing is recorded and the
            # client may push again (UNAVAILABLE); an update is never counted without a folder
            how = self._bind(leaf, "leaf") if leaf.worker is None else "warm"
            run.round.accept(client, weight, time.monotonic())
            self._accepted_since_tick += 1
            self._node_arrivals[node] += 1
            run.cursor = (i + 1) % len(cands)
            leaf.pending.append((slot, weight))
            leaf.clients.append(client)
            run.num_updates += 1
            self.metrics.updates_received.labels(run.round.job).inc()
            n = len(run.round.accepted)
            w = leaf.worker
            self._maybe_close(run, forced=False)
            self._pump(w)
            cur = w.current
            if cur is not None and any(u[0] == slot for u in cur.cmd.get("updates", ())):
                start = "cold" if how == "cold" else "warm"
                self.metrics.dispatches.labels(start).inc()
                self.metrics.dispatch_seconds.labels(start).observe(time.perf_counter() - t_event)
            return n

    def _leaf_folded(self, run: RoundRun, leaf: LeafRun, batch, reply: dict) -> None:
        leaf.commit()
        leaf.contains.add(leaf.index)
        leaf.folding = 0
        leaf.folded += len(batch)
        leaf.worker.updates_folded += len(batch)
        secs = reply.get("seconds", 0.0)
        self._fold_s = secs / len(batch) if not self._fold_s else 0.8 * self._fold_s + 0.2 * secs / len(batch)
        self.metrics.fold_seconds.labels("leaf").observe(secs)
        for name, _ in batch:
            self._release_slot(name)
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
        detail = run.round.close_detail(forced)
        if to == State.FAILED:
            self._fail(run, detail)
            return
        run.round.close(State.AGGREGATING, detail)
        self._advance(run)

    def _fail(self, run: RoundRun | None, detail: str) -> None:
        if run is None or run.round.state in (State.DONE, State.FAILED):
            return
        run.round.close(State.FAILED, detail)
        log.warning("round %d of job %s failed: %s", run.round.id, quote(run.round.job), detail)
        self.metrics.rounds.labels("failed").inc()
        for leaf in run.leaves:
            if not leaf.lost:
                for name, _ in leaf.pending:
                    self._release_slot(name)
            leaf.pending.clear()
        run.done_event.set()
        self._maybe_release(run)
        self._evict_old()

    # -- reduction -------------------------------------------------------------
    def _advance(self, run: RoundRun) -> None:
        """Move the reduction forward: complete leaves, fold ready partials, finalise the top."""
        if run.round.state != State.AGGREGATING or run.needs_rebuild:
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
                for k in kids[1:]:  # a child that never received an update adds nothing
                    if (level - 1, k) in done and run.leaves[hier.host(level - 1, k)].fresh:
                        folded.add(k)
                ready = [k for k in kids[1:] if (level - 1, k) in done and k not in folded and k not in folding]
                if ready and not folding:
                    folding.update(ready)
                    host = run.leaves[hier.host(level, j)]
                    role = "top" if level == hier.depth - 1 else "middle"
                    if host.worker is None and not self._bind_or_fail(run, host, role):
                        return
                    elif host.worker.role != role:
                        self.metrics.warm_reuses.inc()  # a finished leaf takes a parent's role
                    host.worker.role = role
                    parts = [run.leaves[hier.host(level - 1, k)].acc.name for k in ready]
                    self._enqueue(host.worker, Task(
                        host.fold_cmd(run.round.id, next(self._gens), partials=parts), run,
                        lambda r, run=run, node=node, ready=ready: self._partials_folded(run, node, ready, r),
                        kind="partial"))
                if len(folded) == len(kids) - 1:
                    done.add(node)
        top = (hier.depth - 1, 0)
        if top in done and not run.finalizing:
            run.finalizing = True
            host = run.leaves[hier.host(*top)]
            if host.worker is None and not self._bind_or_fail(run, host, "top"):
                return
            host.worker.role = "top"
            run.result = self.arena.result_segment(run.round.layout.total_size)
            self._enqueue(host.worker, Task(
                {"op": "finalize", "layout": run.round.id, "acc": host.acc.name,
                 "weight": run.round.total_weight, "out": run.result.name}, run,
                lambda r, run=run: self._finalized(run, r), kind="finalize"))

    def _bind_or_fail(self, run: RoundRun, leaf: LeafRun, role: str) -> bool:
        """Bind a parent's function; if none can start, the round fails with the reason."""
        try:
            self._bind(leaf, role)
            return True
        except LiflError as e:
            self._fail(run, f"no aggregator function for the {role} could start: {e.message}")
            return False

    def _partials_folded(self, run: RoundRun, node, ready, reply: dict) -> None:
        host = run.leaves[run.hier.host(*node)]
        host.commit()
        for k in ready:
            host.contains |= run.leaves[run.hier.host(node[0] - 1, k)].contains
        run.children_folding[node].difference_update(ready)
        run.children_folded[node].update(ready)
        self.metrics.fold_seconds.labels("middle" if node[0] < run.hier.depth - 1 else "top").observe(
            reply.get("seconds", 0.0))
        self._advance(run)

    def _finalized(self, run: RoundRun, reply: dict) -> None:
        rnd = run.round
        span = time.time() - rnd.opened
        if span > 0:
            self._last_round_rate = len(rnd.accepted) / span
        rnd.post_arrival_s = time.monotonic() - rnd.last_arrival
        rnd.state = State.DONE
        total = sum(self._node_arrivals.values())
        if total:  # how arrivals split over nodes' gateways: the next round's plan starts from it
            self._last_node_share = {n: c / total for n, c in self._node_arrivals.items()}
            self._node_arrivals.clear()
        self.metrics.post_arrival.observe(rnd.post_arrival_s)
        self.metrics.round_duration.observe(time.time() - rnd.opened)
        self.metrics.rounds.labels("done").inc()
        log.info("round %d of job %s done: %d updates, total weight %g", rnd.id, quote(rnd.job),
                 len(rnd.accepted), rnd.total_weight)
        run.done_event.set()
        self._evict_old()

    def _maybe_release(self, run: RoundRun) -> None:
        """Give a finished round's accumulators back once no command still uses them."""
        if run.released or run.tasks_in_flight > 0 or run.round.state not in (State.DONE, State.FAILED):
            return
        run.released = True
        workers = {id(leaf.worker): leaf.worker for leaf in run.leaves if leaf.worker is not None}
        self._release_accs(run)
        for leaf in run.leaves:
            self._unbind(leaf)
        for w in workers.values():
            if run.round.id in w.layouts:
                w.layouts.discard(run.round.id)
                self._enqueue(w, Task({"op": "forget", "segments": [], "layouts": [run.round.id]}, None))
        self._let_go_of_memory()

    def _let_go_of_memory(self) -> None:
        """With no round running, unlink the cached update slots and accumulators
        (``release_idle_shm``): an idle server then holds only the results it keeps, and the next
        round pays a few ms per model-sized segment to map fresh ones. Functions are told to unmap
        every segment the arena unlinked: a segment still mapped is still memory."""
        if self.config.release_idle_shm and not any(
                r.round.state in (State.OPEN, State.AGGREGATING) for r in self._runs.values()):
            self.arena.trim()
        names = self.arena.drain_unlinked()
        if names:
            for w in self._workers:
                if not w.dead:
                    self._enqueue(w, Task({"op": "forget", "segments": names, "layouts": []}, None))

    def _evict_old(self) -> None:
        """Forget finished rounds beyond ``keep_rounds``. A finished round lets go of the model it
        was opened with at once (only results are kept): its clients have fetched it, the
        operator has it, and when it was another round's result that round keeps it; holding
        it would pin one more model per kept round."""
        finished = [r for r in self._runs.values() if r.round.state in (State.DONE, State.FAILED)]
        for run in finished:
            if run.initial is not None and run.readers == 0:
                self.arena.free(run.initial.name)
                run.initial = None
        for run in finished[:-self.config.keep_rounds] if self.config.keep_rounds else finished:
            if run.readers == 0 and run.released:
                if run.result is not None:
                    self.arena.recycle_as_slot(run.result.name)
                if run.initial is not None:
                    self.arena.free(run.initial.name)
                del self._runs[run.round.id]
        self._let_go_of_memory()

    # -- results -----------------------------------------------------------------
    @contextmanager
    def model(self, job: str, rid: int, initial: bool, wait_s: float,
              alive: Callable[[], bool] = lambda: True) -> Iterator[tuple[RoundRun, Segment]]:
        """Hold a round's result (or initial model) for reading; waits up to wait_s for the result,
        or until ``alive()`` turns false (the client went away: its thread is freed at once)."""
        with self._lock:
            run = self.get(job, rid)
            run.readers += 1
        try:
            if initial:
                if run.initial is None and run.from_round:
                    raise LiflError("NOT_FOUND", f"round {rid} is finished and its initial model was round "
                                                 f"{run.from_round}'s result: pull that round's result instead")
                if run.initial is None and run.round.state in (State.DONE, State.FAILED):
                    raise LiflError("NOT_FOUND", f"round {rid} is finished and its initial model is no longer "
                                                 "kept (only results are, for the last keep_rounds rounds)")
                if run.initial is None:
                    raise LiflError("NOT_FOUND", f"round {rid} was opened without an initial model")
                yield run, run.initial
                return
            if not _wait(run.done_event, max(0.0, wait_s), alive):
                raise LiflError("DEADLINE_EXCEEDED" if wait_s > 0 else "FAILED_PRECONDITION",
                                f"round {rid} has no result yet (state {run.round.state.name.lower()}, "
                                f"{len(run.round.accepted)}/{run.round.expected} updates); pull with a longer wait")
            if run.round.state == State.FAILED:
                raise LiflError("FAILED_PRECONDITION", f"round {rid} failed: {run.round.detail}")
            yield run, run.result
        finally:
            with self._lock:
                run.readers -= 1
                if run.readers == 0 and run.round.state in (State.DONE, State.FAILED):
                    self._evict_old()   # what a reader kept alive may go now

    def rounds(self) -> list[Round]:
        with self._lock:
            return [r.round for r in self._runs.values()]

    def workers(self) -> list[WorkerSlot]:
        with self._lock:
            return list(self._workers)

    # -- time --------------------------------------------------------------------
    def _tick_period(self) -> float | None:
        """How often the ticker must run: 50 ms while a round is open (deadlines, arrival rate,
        re-planning), 0.5 s while functions wait out their keep-alive, never when nothing runs —
        so an idle service burns no CPU at all."""
        if any(r.round.state == State.OPEN for r in self._runs.values()):
            return 0.05
        return 0.5 if self._workers else None

    def _tick_loop(self) -> None:
        period: float | None = 0.05
        while True:
            self._wake.wait(period)
            self._wake.clear()
            if self._stop:
                return
            with self._lock:
                period = self._tick_period()
                for run in list(self._runs.values()):
                    self._guarded(f"deadline of round {run.round.id}", self._tick_deadline, run)
                    self._guarded(f"re-planning round {run.round.id}", self._replan, run)
                self._guarded("autoscaling", self._autoscale)

    def _tick_deadline(self, run: RoundRun) -> None:
        if run.round.state == State.OPEN and run.round.deadline_s:
            self._maybe_close(run, forced=False)

    @staticmethod
    def _guarded(what: str, step, *args) -> None:
        """One step of the control loop: an error is logged and the loop goes on (it never dies)."""
        try:
            step(*args)
        except Exception:
            log.exception("control loop: %s failed; continuing", what)

    def _prestart_node(self) -> str | None:
        """Where a pre-started function is most useful: a node with open-round leaves still unbound."""
        if not self.multi_node:
            return "local"
        want = collections.Counter(leaf.node for r in self._runs.values() if r.round.state == State.OPEN
                                   for leaf in r.leaves if leaf.worker is None and not leaf.lost)
        have = collections.Counter(w.node for w in self._workers if w.state() is InstanceState.IDLE)
        short = [(want[n] - have[n], n) for n in sorted(want) if want[n] > have[n]]
        return max(short)[1] if short else None

    # -- node loss (multi-node runtimes) ---------------------------------------------
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
        for w in [w for w in self._workers if w.node == node]:
            w.dead = True
            self._workers.remove(w)
            for task in ([w.current] if w.current is not None else []) + list(w.queue):
                if task.run is not None:
                    task.run.tasks_in_flight -= 1
            w.current, w.queue = None, collections.deque()
        if hasattr(self.runtime, "forget_streams"):
            for job, rid, client in self.runtime.forget_streams(node):
                run = self._runs.get(rid)
                if run is not None:
                    run.round.abandon(client)
        for run in list(self._runs.values()):  # failing a round may evict finished ones
            if run.round.state not in (State.OPEN, State.AGGREGATING):
                continue
            lost = [leaf for leaf in run.leaves if leaf.node == node and not leaf.lost]
            if not lost:
                continue
            run.lost_nodes.add(node)
            for leaf in lost:
                leaf.lost, leaf.worker, leaf.folding = True, None, 0
                leaf.pending.clear()
            run.needs_rebuild = True
            self._try_rebuild(run)
            self._maybe_release(run)

    def _try_rebuild(self, run: RoundRun) -> None:
        """Drop what a lost node held and rebuild the tree over the partial sums that survive.

        While the round is open no parent has folded yet, so every surviving leaf is a
        root of its own; once aggregating, wait until no command is in flight, then the
        roots are the surviving accumulators not already folded into another survivor.
        """
        r = run.round
        if r.state not in (State.OPEN, State.AGGREGATING):
            run.needs_rebuild = False
            return
        if r.state == State.AGGREGATING and run.tasks_in_flight > 0:
            return
        run.needs_rebuild = False
        alive = [leaf for leaf in run.leaves if not leaf.lost]
        kept = set().union(*(leaf.contains for leaf in alive))
        gone = [c for leaf in run.leaves if leaf.lost and leaf.index not in kept for c in leaf.clients]
        for leaf in run.leaves:
            if leaf.lost and leaf.index not in kept:
                leaf.clients.clear()
        for c in gone:
            w = r.accepted.pop(c, None)
            if w is not None:
                r.total_weight -= w
        self.metrics.updates_lost.inc(len(gone))
        if gone:
            r.detail = (f"{len(gone)} update(s) lost with node(s) {', '.join(sorted(run.lost_nodes))}"
                        + ("; their clients may push again" if r.state == State.OPEN else ""))
        if not alive:
            self._fail(run, f"every leaf of round {r.id} was on lost node(s) {sorted(run.lost_nodes)}")
            return
        roots = [leaf for leaf in alive if not any(leaf.index in o.contains for o in alive if o is not leaf)]
        if r.state == State.AGGREGATING and len(r.accepted) < r.quorum:
            self._fail(run, f"{len(gone)} update(s) were lost with node(s) {sorted(run.lost_nodes)}; "
                            f"{len(r.accepted)} left, below the quorum of {r.quorum}")
            return
        ranks = {n.name: i for i, n in enumerate(self._nodes())}
        order = sorted((leaf.index for leaf in roots), key=lambda i: (ranks.get(run.leaves[i].node, 0), i))
        run.hier = build_tree(order, max(2, run.hier.fan_in), leaves=len(run.leaves))
        run.nodes_done, run.children_folded, run.children_folding = set(), {}, {}
        run.finalizing = False
        if r.state == State.OPEN:
            self._maybe_close(run, forced=False)
        else:
            self._advance(run)

    def observation(self, now: float) -> Observation:
        """What the autoscaler sees: functions, arrival rate, backlog, leaves that hold a function."""
        depth = sum(len(l.pending) + l.folding for r in self._runs.values() for l in r.leaves)
        required = sum(1 for r in self._runs.values() for l in r.leaves if l.worker is not None)
        insts = tuple(Instance(w.handle.id, w.node, w.state(), w.role, w.idle_since) for w in self._workers)
        return Observation(insts, self._arrivals, depth, required, 1.0 / self._fold_s if self._fold_s else 0.0)

    def _autoscale(self) -> None:
        """Execute the autoscaler's decision: pre-start functions for a rising load, stop idle ones."""
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        rate = self._accepted_since_tick / dt if dt > 0 else 0.0
        self._accepted_since_tick = 0
        keep = 0.7 ** (dt / 0.05)  # the same decay per second whatever the tick period
        self._arrivals = keep * self._arrivals + (1 - keep) * rate
        if self._arrivals < 0.01:  # the average decays geometrically; call a trickle this small none
            self._arrivals = 0.0
        obs = self.observation(now)
        d = decide(self._scale_state, obs, now, self.policy)
        self._scale_state = d.state
        self.metrics.queue_depth.set(obs.queue_depth)
        if self._closing:
            return
        for _ in range(min(d.start, self.config.workers - len(self._workers))):
            node = self._prestart_node()
            if node is None:
                break
            try:
                w = self._spawn(node if self.multi_node else None)
            except LiflError as e:  # a pre-start is an optimisation: the next push starts one itself
                log.warning("pre-starting a function failed: %s", e.message)
                break
            w.role = "idle"
        for wid in d.stop:
            w = next((w for w in self._workers if w.handle.id == wid), None)
            if w is not None and w.state() is InstanceState.IDLE:
                self._workers.remove(w)
                self.metrics.scale_downs.inc()
                threading.Thread(target=self.runtime.stop_worker, args=(w.handle,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            for run in list(self._runs.values()):  # failing a round evicts finished ones
                if run.round.state in (State.OPEN, State.AGGREGATING):
                    self._fail(run, "the server shut down")
        self._stop = True
        self._wake.set()
        self._ticker.join(timeout=2)
        self.runtime.close()
