"""When aggregator functions start and stop, and which warm instance takes which role.

Serverless means no aggregator runs without work, yet a bursty trace must not
make instances flap. The rules, per pool (call ``decide`` once per node, or
once for the local runtime's single machine):

* **Event-driven start.** The target is 0 without work; the first event
  (an arrival, a queued update, or an open round's plan) raises it to >= 1 and
  instances are started in the same call. Scale-up is never delayed: being
  late costs aggregation latency, being early costs a little idle CPU.
* **Target.** The largest of what open rounds' plans hold (``required``),
  arrivals over ``target_utilisation`` x one instance's service rate, and the
  backlog drained within ``drain_target_s`` — clamped to [min, max].
* **Hysteresis, on the way down only.** An instance is stopped only when (a) it
  is IDLE (no role; WARM instances hold a round's accumulator and are never
  stopped), (b) it has been idle for ``keep_alive_s``, and (c) the highest
  target seen over the last ``stabilization_s`` is below the pool size. A
  trace whose gaps are shorter than the keep-alive therefore causes no scale
  event at all after its first burst; after the keep-alive the pool goes to 0.

``assign_roles`` turns "a leaf/middle/top is needed on node n" into warm
reuses rather than cold starts.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from dataclasses import dataclass

from .model import (AutoscalerState, Instance, InstanceState, Observation, RoleAssignment, RoleRequest,
                    ScaleDecision, ScalePolicy)

__all__ = ["target_instances", "decide", "assign_roles", "choose_function", "BindChoice"]


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def target_instances(obs: Observation, policy: ScalePolicy) -> int:
    """Instances this pool needs right now (0 when it has no work at all)."""
    if obs.queue_depth <= 0 and obs.arrival_rate_per_s <= 0 and obs.required <= 0:
        return policy.min_instances
    need = max(1, obs.required)
    mu = obs.service_rate_per_instance
    if mu > 0:
        need = max(need, _ceil(obs.arrival_rate_per_s / (policy.target_utilisation * mu)),
                   _ceil(obs.queue_depth / (mu * policy.drain_target_s)))
    return min(policy.max_instances, max(policy.min_instances, need))


def decide(state: AutoscalerState, obs: Observation, now: float, policy: ScalePolicy) -> ScaleDecision:
    """One scaling step: how many to start, which idle instances to stop, and the state to keep.

    Pure: the runtime executes the decision and passes ``decision.state`` back
    next time. Stops are the longest-idle instances first (ties by id).
    """
    target = target_instances(obs, policy)
    # keep only samples inside the window that a later, larger sample does not dominate
    kept = [(t, d) for t, d in state.history if now - t < policy.stabilization_s and d > target]
    history = tuple(kept) + ((now, target),)
    floor = max(d for _, d in history)
    n = len(obs.instances)
    start, stop, reason = 0, (), "steady"
    if target > n:
        start = target - n
        reason = "first event" if n == 0 else f"target {target} > {n} instances"
    elif floor < n:
        idle = sorted((i for i in obs.instances
                       if i.state is InstanceState.IDLE and now - i.last_used >= policy.keep_alive_s),
                      key=lambda i: (i.last_used, i.id))
        stop = tuple(i.id for i in idle[:n - floor])
        if stop:
            reason = "scale to zero" if n - len(stop) == 0 else f"idle past keep-alive, floor {floor}"
        else:
            reason = f"floor {floor} < {n} instances, none idle past keep-alive"
    return ScaleDecision(start, stop, target, floor, reason, AutoscalerState(history))


def assign_roles(instances: Sequence[Instance], needed: Sequence[RoleRequest], *,
                 allow_remote: bool = False) -> RoleAssignment:
    """Give each needed role a warm IDLE instance where possible; the rest are cold starts.

    Preference, in passes over the requests in order: an idle instance on the
    request's node that last served the same role (its caches fit), then any
    idle instance on that node, then (only with ``allow_remote``) one on another
    node — off by default because a leaf away from its gateway's node would pull
    whole updates across the network, which costs more than a cold start.
    Within a pass the most recently used instance wins (ties by id). Per node
    this reuses min(idle, needed) instances, the most possible.
    """
    keys = [r.key for r in needed]
    if len(set(keys)) != len(keys):
        raise ValueError("role request keys must be unique")
    free = sorted((i for i in instances if i.state is InstanceState.IDLE), key=lambda i: (-i.last_used, i.id))
    taken: set[str] = set()
    reuse: dict[str, str] = {}
    passes = [lambda r, i: i.node == r.node and i.role == r.role, lambda r, i: i.node == r.node]
    if allow_remote:
        passes.append(lambda r, i: True)
    for ok in passes:
        for r in needed:
            if r.key in reuse:
                continue
            inst = next((i for i in free if i.id not in taken and ok(r, i)), None)
            if inst is not None:
                reuse[r.key] = inst.id
                taken.add(inst.id)
    return RoleAssignment(reuse, tuple(r for r in needed if r.key not in reuse))


@dataclass(frozen=True)
class BindChoice:
    how: str                  # "warm" (reuse an idle instance), "cold" (start one), "shared" (queue on a busy one)
    instance: str | None = None


def choose_function(instances: Sequence[Instance], node: str, role: str, can_start: bool,
                    load: dict[str, int] | None = None) -> BindChoice:
    """Which function takes a role on ``node``: a warm idle one there (``assign_roles``: same role
    first, most recently used), else a cold start when the pool may grow, else the least loaded
    instance there (``load``: id -> bindings and queued commands). A node with none at all
    always gets a cold start."""
    here = [i for i in instances if i.node == node]
    got = assign_roles(here, [RoleRequest("x", role, node)])
    if got.reuse:
        return BindChoice("warm", got.reuse["x"])
    if can_start or not here:
        return BindChoice("cold")
    load = load or {}
    return BindChoice("shared", min(here, key=lambda i: (load.get(i.id, 0), i.id)).id)


def prestart_node(nodes: Sequence[str], unbound: Mapping[str, int], idle: Mapping[str, int]) -> str | None:
    """Where a pre-started function is most useful. One machine: there. Several: the node whose
    open-round leaves still lack a function (``unbound``) most outnumber its idle functions;
    none (None) when every such leaf could be served by an idle function already."""
    if len(nodes) == 1:
        return nodes[0]
    short = [(unbound[n] - idle.get(n, 0), n) for n in sorted(unbound) if unbound[n] > idle.get(n, 0)]
    return max(short)[1] if short else None


def capacity_bundles(rounds_running: bool, workers: int, function_cpus: float) -> list[dict]:
    """What to ask a cluster autoscaler (Ray's) for: room for ``workers`` functions while any round
    runs — it adds nodes when the cluster is smaller — and nothing when idle, so that nodes left
    without functions (scale to zero) may be removed. Whole CPUs: Ray's request takes integers."""
    return [{"CPU": max(1, math.ceil(function_cpus))}] * workers if rounds_running else []
