"""Planner: static shapes unchanged, the latency model, keep-up, and optimality against brute force."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifl.control.model import FoldCosts, Hierarchy, Load, Node, PlannerPolicy, Resources
from lifl.control.planner import (batch_seconds, best_fan_in, build_tree, critical_path_seconds, leaf_service_rate,
                                  leaf_tail_seconds, plan_elastic, plan_from_depth, plan_static, replan, route_leaf,
                                  tree_seconds)

GiB = 2**30
costs_st = st.builds(FoldCosts,
                     update_s=st.floats(1e-4, 0.5),
                     fuse_speedup=st.floats(1.0, 8.0),
                     partial_s=st.one_of(st.none(), st.floats(1e-4, 0.5)),
                     finalize_s=st.floats(0.0, 0.1),
                     max_batch=st.integers(1, 32))


def node(name: str, cores: float) -> Node:
    return Node(name, cores, 64 * GiB, 8 * GiB)


def post_arrival(leaves: int, fan_in: int, rate: float, expected: int, costs: FoldCosts) -> float:
    """The documented latency model for one node, written out independently of the planner's search."""
    tail = leaf_tail_seconds(rate / leaves, costs, expected / leaves)
    return tail + critical_path_seconds(plan_static(leaves, fan_in), costs) + costs.finalize_s


# -- the static API the dispatcher uses -----------------------------------------------------
def test_static_shapes_unchanged():
    h = plan_static(5, 2)
    assert h.levels == ((), ((0, 1), (2, 3), (4,)), ((0, 1), (2,)), ((0, 1),))
    assert (h.depth, h.fan_in, h.host(3, 0), h.parent(0, 4), h.parent(3, 0)) == (4, 2, 0, (1, 2), None)
    assert h.describe() == "5 -> 3 -> 2 -> 1 (fan-in 2, depth 4)"
    assert plan_static(1, 1) == Hierarchy(1, 1, ((),))
    assert plan_from_depth(3, 4).leaves == 16
    assert route_leaf([2, 0, 0], [False, True, False], 1) == 2
    with pytest.raises(ValueError):
        plan_static(3, 1)


@given(st.integers(1, 300), st.integers(2, 40))
def test_build_tree_over_identity_is_plan_static(leaves, fan_in):
    assert build_tree(range(leaves), fan_in) == plan_static(leaves, fan_in)


@given(st.integers(1, 300), st.integers(2, 40), costs_st)
def test_closed_form_tree_matches_critical_path(leaves, fan_in, costs):
    assert tree_seconds(leaves, fan_in, costs) == pytest.approx(
        critical_path_seconds(plan_static(leaves, fan_in), costs), rel=1e-12, abs=1e-15)


# -- the cost model ----------------------------------------------------------------------------
def test_fusion_model():
    c = FoldCosts(update_s=0.01, fuse_speedup=4.0, max_batch=16)
    assert batch_seconds(0.01, 1, 4.0) == pytest.approx(0.01)
    assert batch_seconds(0.01, 16, 4.0) == pytest.approx(0.01 * (0.75 + 4))
    assert batch_seconds(0.01, 0, 4.0) == 0.0
    assert leaf_service_rate(c) == pytest.approx(16 / 0.0475)
    assert leaf_service_rate(FoldCosts(update_s=0.01)) == pytest.approx(100.0)  # no fusion: 1/t


@given(costs_st, st.floats(0.0, 1e4), st.floats(0.0, 1e4))
def test_tail_grows_with_rate(costs, r1, r2):
    lo, hi = sorted((r1, r2))
    assert costs.update_s <= leaf_tail_seconds(lo, costs, 1000) <= leaf_tail_seconds(hi, costs, 1000) + 1e-12


# -- elastic planning ---------------------------------------------------------------------------
@given(st.integers(2, 120), costs_st)
@settings(max_examples=150)
def test_fan_in_matches_brute_force(leaves, costs):
    f, cost = best_fan_in(leaves, costs)
    brute = min(tree_seconds(leaves, g, costs) for g in range(2, leaves + 1))
    assert cost == pytest.approx(brute, rel=1e-12, abs=1e-15)
    assert tree_seconds(leaves, f, costs) == pytest.approx(cost, rel=1e-12, abs=1e-15)


@given(expected=st.integers(1, 200), rate=st.floats(0.0, 3000.0), cores=st.integers(1, 48), costs=costs_st)
@settings(max_examples=120, deadline=None)
def test_single_node_plan_is_optimal_and_keeps_up(expected, rate, cores, costs):
    policy = PlannerPolicy(latency_slack=0.0)
    p = plan_elastic(Load(expected, rate), costs, [node("n", cores)], policy=policy)
    mu = leaf_service_rate(costs)
    hi = min(cores, expected, policy.max_leaves)
    feasible = [L for L in range(1, hi + 1) if rate / (L * mu) <= policy.max_utilisation]
    assert p.leaves <= hi
    assert p.hierarchy == plan_static(p.leaves, p.fan_in)  # one node: exactly the static shape
    if feasible:  # capacity allows keeping up: it does, and nothing feasible is faster
        assert p.keeps_up and p.service_rate_per_s * policy.max_utilisation >= rate * (1 - 1e-9)
        brute = min(post_arrival(L, f, rate, expected, costs) for L in feasible for f in range(2, max(L, 2) + 1))
        assert p.latency.total_s == pytest.approx(brute, rel=1e-9, abs=1e-12)
        # its fan-in is the brute-force best for its leaf count
        best_f = min(post_arrival(p.leaves, f, rate, expected, costs) for f in range(2, max(p.leaves, 2) + 1))
        assert post_arrival(p.leaves, p.fan_in, rate, expected, costs) == pytest.approx(best_f, rel=1e-9, abs=1e-12)
    else:  # it cannot: the most service it can get
        assert not p.keeps_up and p.leaves == hi


@given(expected=st.integers(1, 200), rate=st.floats(0.0, 3000.0), slack=st.floats(0.0, 0.5), costs=costs_st)
@settings(max_examples=60, deadline=None)
def test_slack_trades_latency_for_fewer_leaves(expected, rate, slack, costs):
    nodes = [node("n", 32)]
    tight = plan_elastic(Load(expected, rate), costs, nodes, policy=PlannerPolicy(latency_slack=0.0))
    loose = plan_elastic(Load(expected, rate), costs, nodes, policy=PlannerPolicy(latency_slack=slack))
    assert loose.leaves <= tight.leaves
    assert loose.latency.total_s <= tight.latency.total_s * (1 + slack) + 1e-12


shares_st = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=1, max_size=4).filter(
    lambda s: sum(s) > 0.01)


@given(shares=shares_st, rate=st.floats(0.0, 5000.0), expected=st.integers(1, 400), costs=costs_st,
       cores=st.lists(st.integers(1, 24), min_size=4, max_size=4))
@settings(max_examples=100, deadline=None)
def test_multi_node_keeps_up_where_capacity_allows(shares, rate, expected, costs, cores):
    nodes = [node(f"n{i}", cores[i]) for i in range(len(shares))]
    share = {n.name: s for n, s in zip(nodes, shares)}
    receiving = sum(1 for s in shares if s > 0)
    if receiving > sum(cores[:len(shares)]):
        return
    p = plan_elastic(Load(expected, rate, share), costs, nodes)
    per = p.leaves_per_node()
    mu, total = leaf_service_rate(costs), sum(shares)
    assert p.leaves <= sum(n.cores for n in nodes)
    assert sorted(per) == sorted(n.name for n, s in zip(nodes, shares) if s > 0)  # leaves only where updates land
    assert list(p.leaf_home) == sorted(p.leaf_home, key=[n.name for n in nodes].index)  # contiguous by node
    for n, s in zip(nodes, shares):
        if s > 0 and p.keeps_up:
            assert rate * s / total <= per[n.name] * mu * PlannerPolicy().max_utilisation * (1 + 1e-9)
    # when every node's keep-up need fits its share of clients and the total fits the capacity, it keeps up
    live = [s / total for s in shares if s > 0]
    need = [max(1, math.ceil(rate * s / (mu * 0.8) - 1e-9)) for s in live]
    room = max(len(live), min(sum(n.cores for n in nodes), 256, expected))
    if sum(need) <= room and all(k <= max(1, math.ceil(expected * s - 1e-9)) for k, s in zip(need, live)):
        assert p.keeps_up


def test_plan_is_deterministic():
    c = FoldCosts(update_s=0.004, fuse_speedup=3.0, partial_s=0.006, finalize_s=0.002)
    nodes = [node("a", 8), node("b", 8), node("c", 4)]
    load = Load(500, 2500.0, {"a": 0.5, "b": 0.3, "c": 0.2})
    assert plan_elastic(load, c, nodes) == plan_elastic(load, c, nodes)


def test_plan_grows_with_rate_and_rejects_bad_input():
    c = FoldCosts(update_s=0.01, fuse_speedup=4.0, partial_s=0.012)
    nodes = [node("a", 64)]
    sizes = [plan_elastic(Load(10_000, r), c, nodes).leaves for r in (10, 300, 1000, 3000, 9000)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] > 10
    with pytest.raises(ValueError):
        plan_elastic(Load(0, 1.0), c, nodes)
    with pytest.raises(ValueError):
        plan_elastic(Load(10, 1.0, {"zzz": 1.0}), c, nodes)
    with pytest.raises(ValueError, match="only 2 aggregator slots"):  # three receiving nodes, two slots
        plan_elastic(Load(10, 1.0, {"a": 1, "b": 1, "c": 1}), c, [node("a", 1), node("b", 1), node("c", 0.4)])
    # shared memory can be the binding dimension: 3 accumulators of 3 GiB in an 8 GiB budget
    assert plan_elastic(Load(100, 1e5), c, nodes, demand=Resources(cores=1, shm_bytes=3 * GiB)).leaves == 2


def test_replan_keeps_leaves_and_adds_when_rate_jumps():
    c = FoldCosts(update_s=0.01, fuse_speedup=4.0, partial_s=0.012)
    nodes = [node("a", 16), node("b", 16)]
    share = {"a": 0.7, "b": 0.3}
    p = plan_elastic(Load(2000, 200.0, share), c, nodes)
    same = replan(p, Load(2000, 210.0, share), c, nodes, received=100)
    assert same is p  # a small change is not worth a new tree
    q = replan(p, Load(2000, 2000.0, share), c, nodes, received=100)
    assert q.leaves > p.leaves and q.keeps_up
    assert q.leaf_home[:p.leaves] == p.leaf_home  # existing leaves keep index and node
    hosts = {leaf for group in q.hierarchy.levels[1] for leaf in group}
    assert hosts == set(range(q.leaves))
    # appended leaves are grouped with their node's leaves
    first_level = q.hierarchy.levels[1]
    order = [leaf for g in first_level for leaf in g]
    assert [q.leaf_home[i] for i in order] == sorted((q.leaf_home[i] for i in order), key=["a", "b"].index)
    # a rate drop never removes leaves
    assert replan(q, Load(2000, 10.0, share), c, nodes, received=1500).leaves >= q.leaves


def test_replan_serves_a_node_that_starts_receiving():
    c = FoldCosts(update_s=0.01)
    nodes = [node("a", 4), node("b", 4)]
    p = plan_elastic(Load(100, 20.0, {"a": 1.0}), c, nodes)
    assert set(p.leaf_home) == {"a"}
    q = replan(p, Load(100, 20.0, {"a": 0.5, "b": 0.5}), c, nodes, received=10)
    assert q is not p and "b" in q.leaf_home and q.keeps_up
