"""Hierarchy plans: how many leaves fold client updates, where, and how partial sums climb to the top.

Static plans (``plan_static``, ``plan_from_depth``) take the shape from the
config. ``plan_elastic`` derives it from the load and measured fold costs, and
``replan`` adjusts it when the arrival rate changes mid-round.

The model behind ``plan_elastic`` (all inputs measured, see ``FoldCosts``)
--------------------------------------------------------------------------
Fused fold: folding k inputs in one pass costs
``batch(s, k) = s * ((1 - 1/F) + k/F)``: one pass over the float64
accumulator plus k input reads, so the per-input cost falls toward s/F (F =
``fuse_speedup``; F = 1 means no fusion). s is ``update_s`` for client updates
and ``partial_s`` for children's partial sums.

Leaf service rate: a saturated leaf folds batches of B = ``max_batch``, so
``mu = B / batch(update_s, B)`` updates/s. Keep-up: on every node n,
``lambda_n <= u_max * L_n * mu`` (u_max = ``max_utilisation`` < 1), because a
leaf folds the updates of its own node's gateway (locality) and a queue with
utilisation >= 1 grows for the whole round.

Leaf tail (time from the last arrival until its leaf is done), fluid model at
per-leaf rate r: if ``r * update_s <= 1`` each update is folded alone and the
leaf is busy a fraction rho = r*update_s, so the last update waits on average
half a fold with probability rho: ``tail = rho*update_s/2 + update_s``.
Otherwise the leaf is always busy with batches of b, where b arrive while b are
folded: ``b = r*batch(b)`` gives ``b = r*a / (1 - r*c)`` (a = update_s(1-1/F),
c = update_s/F); the last update waits half a batch and then rides the next:
``tail = 1.5 * batch(update_s, b)``. Past mu the backlog grows; its drain is
added (such plans are reported ``keeps_up=False``).

Tree: partial folds start when the round closes (the dispatcher reduces
after close), so the conservative critical path is every level's largest
group folded after its slowest child: ``tree = sum over levels of
batch(partial_s, g_k - 1)``, g_k = the largest group at level k (the host
child is folded into, the other g_k - 1 partials are folded in).

Post-arrival latency = max leaf tail + tree + ``finalize_s``.

Choice: for every leaf count L from one leaf per receiving node up to
min(capacity, expected clients, ``max_leaves``) — leaves added one at a time
to the node with the highest per-leaf arrival rate (water-filling, which
minimises the worst tail for each L) — take the fan-in minimising the tree
(``best_fan_in``), keep the L that keep up, and pick the fewest leaves whose
latency is within ``latency_slack`` of the best. More leaves shorten the tail
and lengthen the tree, so the optimum is interior and found by this scan.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from .model import FoldCosts, Hierarchy, LatencyBreakdown, Load, Node, Plan, PlannerPolicy, Resources

__all__ = [
    "Hierarchy", "plan_static", "plan_from_depth", "route_leaf", "build_tree",
    "batch_seconds", "leaf_service_rate", "leaf_tail_seconds", "tree_seconds", "critical_path_seconds",
    "best_fan_in", "plan_elastic", "replan",
]


# -- static plans (used by the dispatcher) ----------------------------------------------------
def build_tree(order: Iterable[int], fan_in: int, leaves: int | None = None) -> Hierarchy:
    """A tree whose first level groups consecutive leaves of ``order`` (leaf indices), ``fan_in`` at a time.

    ``order`` lets the planner keep each node's leaves together so that groups
    rarely straddle nodes; its first leaf hosts the top. With ``leaves`` given,
    ``order`` may name a subset of ``range(leaves)``: the tree then joins only
    those (the others hold nothing, e.g. leaves lost with their node).
    """
    order = tuple(order)
    if leaves is None:
        leaves = len(order)
        if sorted(order) != list(range(leaves)):
            raise ValueError("order must be a permutation of the leaf indices")
    elif len(set(order)) != len(order) or not all(0 <= i < leaves for i in order):
        raise ValueError(f"order must name distinct leaves among 0..{leaves - 1}")
    if not order:
        raise ValueError(f"need at least one leaf, got {len(order)}")
    if fan_in < 2 and len(order) > 1:
        raise ValueError(f"fan-in must be >= 2 to join {len(order)} leaves, got {fan_in}")
    levels: list[tuple[tuple[int, ...], ...]] = [()]
    items = order
    while len(items) > 1:
        groups = tuple(items[i:i + fan_in] for i in range(0, len(items), fan_in))
        levels.append(groups)
        items = tuple(range(len(groups)))
    if len(levels) == 1 and order[0] != 0:  # one leaf of a subset: name it as the top's host
        levels.append(((order[0],),))
    return Hierarchy(leaves, max(fan_in, 1), tuple(levels))


def plan_static(leaves: int, fan_in: int) -> Hierarchy:
    """A balanced tree over ``leaves`` leaves with at most ``fan_in`` children per parent."""
    if leaves < 1:
        raise ValueError(f"need at least one leaf, got {leaves}")
    return build_tree(range(leaves), fan_in)


def plan_from_depth(depth: int, fan_in: int) -> Hierarchy:
    """A full tree of the given depth: fan_in**(depth-1) leaves."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return plan_static(fan_in ** (depth - 1), fan_in)


def route_leaf(pending: list[int], busy: list[bool], cursor: int) -> int:
    """Least-loaded leaf for the next update (pending + in-progress), ties broken round-robin from cursor."""
    n = len(pending)
    load = [pending[i] + busy[i] for i in range(n)]
    best = min(load)
    for k in range(n):
        i = (cursor + k) % n
        if load[i] == best:
            return i
    return 0


# -- the cost model ------------------------------------------------------------------------------
def batch_seconds(single_s: float, k: float, fuse_speedup: float) -> float:
    """Seconds to fold k inputs in one fused pass (0 for k <= 0)."""
    if k <= 0:
        return 0.0
    return single_s * ((1.0 - 1.0 / fuse_speedup) + k / fuse_speedup)


def leaf_service_rate(costs: FoldCosts) -> float:
    """Updates/s one saturated leaf folds (batches of ``max_batch``)."""
    b = costs.max_batch
    return b / batch_seconds(costs.update_s, b, costs.fuse_speedup)


def leaf_tail_seconds(rate_per_s: float, costs: FoldCosts, updates: float = 0.0) -> float:
    """Expected time from a leaf's last arrival until it has folded everything (module docstring).

    ``updates``: how many updates the leaf receives in the round; only used
    past saturation, to size the backlog left when arrivals stop.
    """
    t, f = costs.update_s, costs.fuse_speedup
    mu = leaf_service_rate(costs)
    if rate_per_s >= mu:  # saturated: full batches, plus the backlog that piled up
        backlog = (1.0 - mu / rate_per_s) * updates if rate_per_s > 0 else 0.0
        return 1.5 * batch_seconds(t, costs.max_batch, f) + backlog / mu
    rho = rate_per_s * t
    if rho <= 1.0:
        return rho * t / 2.0 + t
    a, c = t * (1.0 - 1.0 / f), t / f
    b = min(rate_per_s * a / (1.0 - rate_per_s * c), float(costs.max_batch))
    return 1.5 * batch_seconds(t, b, f)


def tree_seconds(leaves: int, fan_in: int, costs: FoldCosts) -> float:
    """Critical-path partial-fold seconds of ``build_tree`` over ``leaves`` leaves (closed form)."""
    total, width = 0.0, leaves
    while width > 1:
        total += batch_seconds(costs.partial, min(fan_in, width) - 1, costs.fuse_speedup)
        width = -(-width // fan_in)
    return total


def critical_path_seconds(hier: Hierarchy, costs: FoldCosts) -> float:
    """Critical-path partial-fold seconds of any hierarchy: a parent starts after its slowest child."""
    done = [0.0] * hier.leaves
    for level in hier.levels[1:]:
        done = [max(done[k] for k in kids) + batch_seconds(costs.partial, len(kids) - 1, costs.fuse_speedup)
                for kids in level]
    return done[0]


def _min_fan_in(leaves: int, levels: int) -> int:
    """Smallest f >= 2 with f**levels >= leaves (at most ``levels`` levels above the leaves)."""
    f = max(2, round(leaves ** (1.0 / levels)))
    while f > 2 and (f - 1) ** levels >= leaves:
        f -= 1
    while f ** levels < leaves:
        f += 1
    return f


def best_fan_in(leaves: int, costs: FoldCosts) -> tuple[int, float]:
    """(fan-in, tree seconds) minimising ``tree_seconds`` over all fan-ins 2..leaves.

    Only the smallest fan-in of each depth is evaluated (O(log^2 L)): with h
    levels the tree costs h*a + b*((h-1)(f-1) + ceil(L/f^(h-1)) - 1) (a, b >= 0
    from ``batch_seconds``), and (h-1)f + ceil(L/f^(h-1)) does not decrease for
    f >= L^(1/h) — its continuous drop per step is (h-1)L/xi^h < h-1 there.
    Ties go to the larger fan-in (fewer levels, fewer hops between nodes).
    """
    if leaves <= 1:
        return 2, 0.0
    best: tuple[float, int] | None = None
    for h in range(1, max(1, math.ceil(math.log2(leaves))) + 1):
        f = _min_fan_in(leaves, h)
        cost = tree_seconds(leaves, f, costs)
        if best is None or cost < best[0] * (1 - 1e-12) or (cost <= best[0] * (1 + 1e-12) and f > best[1]):
            best = (cost, f)
    assert best is not None  # nosec B101  # the loop runs at least once; this only informs type checkers
    return best[1], best[0]


# -- elastic planning --------------------------------------------------------------------------
def _node_shares(load: Load, nodes: Sequence[Node], slots: Sequence[int]) -> list[float]:
    """Share of arrivals landing at each node's gateway (aligned with ``nodes``)."""
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError("node names must be unique")
    if load.node_share:
        unknown = sorted(set(load.node_share) - set(names))
        if unknown:
            raise ValueError(f"node_share names unknown node(s) {unknown}; nodes are {names}")
        raw = [max(0.0, float(load.node_share.get(n, 0.0))) for n in names]
    else:
        raw = [float(s) for s in slots]
    total = sum(raw)
    if total <= 0:
        raise ValueError("no node receives updates: node_share is all zero or no node has capacity")
    return [r / total for r in raw]


def _score(counts: Sequence[int], share: Sequence[float], load: Load, costs: FoldCosts
           ) -> tuple[LatencyBreakdown, float, int]:
    """(latency, worst utilisation, fan-in) of a per-node leaf allocation."""
    mu = leaf_service_rate(costs)
    tail, util = 0.0, 0.0
    for c, s in zip(counts, share):
        if s <= 0:
            continue
        r = load.arrival_rate_per_s * s / c
        tail = max(tail, leaf_tail_seconds(r, costs, load.expected_clients * s / c))
        util = max(util, r / mu)
    fan_in, tree = best_fan_in(sum(counts), costs)
    return LatencyBreakdown(tail, tree, costs.finalize_s), util, fan_in


def _search(start: Sequence[int], share: Sequence[float], load: Load, costs: FoldCosts, capacity: int,
            policy: PlannerPolicy, limit: int) -> tuple[list[int], LatencyBreakdown, float, int]:
    """Water-fill leaves from ``start`` (up to ``limit`` in all) and pick one allocation.

    Returns (leaves per node, latency, worst utilisation, fan-in) of the choice.
    """
    counts = list(start)
    for i, s in enumerate(share):  # every receiving node needs a leaf of its own
        if s > 0 and counts[i] == 0:
            counts[i] = 1
    if sum(counts) > capacity:
        raise ValueError(f"{sum(counts)} nodes receive updates but only {capacity} aggregator slots exist")
    per_node_cap = [max(c, math.ceil(load.expected_clients * s - 1e-9)) for c, s in zip(counts, share)]
    hi = max(sum(counts), min(capacity, policy.max_leaves, limit))
    cands = []
    while True:
        lat, util, f = _score(counts, share, load, costs)
        cands.append((list(counts), lat, util, f))
        if sum(counts) >= hi:
            break
        open_ = [i for i, s in enumerate(share) if s > 0 and counts[i] < per_node_cap[i]]
        if not open_:
            break
        pick = max(open_, key=lambda i: (share[i] / counts[i], -i))
        counts[pick] += 1
    ok = [c for c in cands if c[2] <= policy.max_utilisation + 1e-12]
    if not ok:  # cannot keep up: the plan that falls behind least
        return min(cands, key=lambda c: (c[2], c[1].total_s))
    best = min(c[1].total_s for c in ok)
    return next(c for c in ok if c[1].total_s <= best * (1 + policy.latency_slack) + 1e-12)


def _make_plan(leaf_home: tuple[str, ...], nodes: Sequence[Node], fan_in: int, lat: LatencyBreakdown,
               util: float, load: Load, costs: FoldCosts, policy: PlannerPolicy) -> Plan:
    rank = {n.name: i for i, n in enumerate(nodes)}
    order = sorted(range(len(leaf_home)), key=lambda i: (rank[leaf_home[i]], i))
    return Plan(build_tree(order, fan_in), leaf_home, lat, util, len(leaf_home) * leaf_service_rate(costs),
                load.arrival_rate_per_s, util <= policy.max_utilisation + 1e-12)


def _slots(nodes: Sequence[Node], demand: Resources) -> list[int]:
    if not nodes:
        raise ValueError("need at least one node")
    return [demand.copies_in(n.capacity) for n in nodes]


def plan_elastic(load: Load, costs: FoldCosts, nodes: Sequence[Node], demand: Resources = Resources(cores=1.0),
                 policy: PlannerPolicy = PlannerPolicy()) -> Plan:
    """Leaves per node, fan-in and depth for a new round (model in the module docstring).

    ``demand`` is one aggregator function's need (cores, memory, its float64
    accumulator in shm); capacity is how many fit on all nodes together.
    Leaves are numbered node by node in ``nodes`` order, so for one node the
    hierarchy equals ``plan_static(plan.leaves, plan.fan_in)``. Leaves beyond a
    node's own capacity are left to ``placement.place`` to spill.
    """
    if load.expected_clients < 1:
        raise ValueError(f"expected_clients must be >= 1, got {load.expected_clients}")
    slots = _slots(nodes, demand)
    share = _node_shares(load, nodes, slots)
    counts, lat, util, f = _search([0] * len(nodes), share, load, costs, sum(slots), policy,
                                   limit=load.expected_clients)
    home = tuple(n.name for n, c in zip(nodes, counts) for _ in range(c))
    return _make_plan(home, nodes, f, lat, util, load, costs, policy)


def replan(current: Plan, load: Load, costs: FoldCosts, nodes: Sequence[Node],
           demand: Resources = Resources(cores=1.0), policy: PlannerPolicy = PlannerPolicy(),
           received: int = 0) -> Plan:
    """Adjust a running round's plan to a changed arrival rate; returns ``current`` itself if not worth it.

    Existing leaves keep their index and home node (their accumulators already
    hold partial sums) and are never removed; new leaves are appended. The tree
    above the leaves is rebuilt freely, which is safe because partial folds
    start only when the round closes. ``load`` describes the rest of the round
    (its rate now); ``received`` updates are already in. The new plan is adopted
    when it restores keep-up or cuts predicted latency by ``replan_gain``.
    """
    remaining = max(1, load.expected_clients - received)
    rest = Load(remaining, load.arrival_rate_per_s, load.node_share)
    slots = _slots(nodes, demand)
    share = _node_shares(rest, nodes, slots)
    names = [n.name for n in nodes]
    missing = sorted(set(current.leaf_home) - set(names))
    if missing:
        raise ValueError(f"the current plan has leaves on node(s) {missing} that are not in nodes")
    have = [sum(1 for h in current.leaf_home if h == n) for n in names]
    if all(c > 0 for c, s in zip(have, share) if s > 0):
        now_lat, now_util, _ = _score(have, share, rest, costs)
    else:  # updates now land on a node without a leaf: the current plan cannot serve them locally
        now_lat, now_util = None, math.inf
    counts, lat, util, f = _search(have, share, rest, costs, max(sum(slots), sum(have)), policy,
                                   limit=sum(have) + remaining)
    cur_ok = now_util <= policy.max_utilisation + 1e-12
    new_ok = util <= policy.max_utilisation + 1e-12
    faster = now_lat is None or lat.total_s < (1 - policy.replan_gain) * now_lat.total_s
    if not ((new_ok and not cur_ok) or (faster and (new_ok or not cur_ok))):
        return current
    home = list(current.leaf_home)
    for name, c, h in zip(names, counts, have):
        home.extend([name] * (c - h))
    return _make_plan(tuple(home), nodes, f, lat, util, rest, costs, policy)
