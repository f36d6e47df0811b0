"""Placement: capacity never exceeded, cross-node bytes minimal, deterministic."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lifl.control.model import Hierarchy, Node, Resources
from lifl.control.placement import PlacementError, cross_node_bytes, level_nodes, place, random_placement
from lifl.control.planner import build_tree, plan_static

GiB = 2**30
MB = 10**6


def nodes_of(cores: list[int]) -> list[Node]:
    return [Node(f"n{i}", c, 64 * GiB, 8 * GiB) for i, c in enumerate(cores)]


@st.composite
def scenarios(draw, max_leaves=24):
    cores = draw(st.lists(st.integers(0, 8), min_size=1, max_size=4))
    nodes = nodes_of(cores)
    leaves = draw(st.integers(1, max_leaves))
    home = [f"n{draw(st.integers(0, len(nodes) - 1))}" for _ in range(leaves)]
    hier = plan_static(leaves, draw(st.integers(2, 6)))
    leaf_bytes = draw(st.lists(st.integers(0, 100 * MB), min_size=leaves, max_size=leaves))
    used = {f"n{i}": Resources(cores=draw(st.integers(0, 2))) for i in range(len(nodes))}
    return hier, home, nodes, leaf_bytes, used


def all_rehostings(hier: Hierarchy):
    """Every hierarchy with the same groups and any choice of host child per group."""
    per_level = [[[(kids[p],) + kids[:p] + kids[p + 1:] for p in range(len(kids))] for kids in level]
                 for level in hier.levels[1:]]
    flat = [opts for level in per_level for opts in level]
    sizes = [len(level) for level in hier.levels[1:]]
    for choice in itertools.product(*flat):
        levels, k = [()], 0
        for n in sizes:
            levels.append(tuple(choice[k:k + n]))
            k += n
        yield Hierarchy(hier.leaves, hier.fan_in, tuple(levels))


@given(scenarios(), st.integers(1, 3))
@settings(max_examples=200, deadline=None)
def test_capacity_never_exceeded(sc, demand_cores):
    hier, home, nodes, leaf_bytes, used = sc
    demand = Resources(cores=demand_cores, shm_bytes=GiB)
    try:
        p = place(hier, home, nodes, demand, leaf_update_bytes=leaf_bytes, partial_bytes=8 * MB, used=used)
    except PlacementError:
        free = sum(demand.copies_in(n.capacity - used[n.name]) for n in nodes)
        assert free < hier.leaves  # it only refuses what really does not fit
        return
    for n in nodes:
        k = p.leaf_node.count(n.name)
        total = used[n.name] + Resources(demand.cores * k, 0, demand.shm_bytes * k)
        assert k == 0 or total.fits_in(n.capacity)  # `used` alone may already exceed a node; we add nothing there
    # same groups, only hosts may change; every leaf placed somewhere
    assert [[sorted(g) for g in lv] for lv in p.hierarchy.levels] == [[sorted(g) for g in lv] for lv in hier.levels]
    assert set(p.spilled) == {i for i in range(hier.leaves) if p.leaf_node[i] != home[i]}
    # a leaf is spilled only if its home node is full of leaves that bring at least as many bytes
    for i in p.spilled:
        kept = [j for j in range(hier.leaves) if home[j] == home[i] and p.leaf_node[j] == home[i]]
        assert all(leaf_bytes[j] >= leaf_bytes[i] for j in kept)


@given(scenarios())
@settings(max_examples=60, deadline=None)
def test_deterministic(sc):
    hier, home, nodes, leaf_bytes, used = sc
    args = dict(leaf_update_bytes=leaf_bytes, partial_bytes=8 * MB, used=used)
    try:
        a = place(hier, home, nodes, **args)
    except PlacementError:
        return
    assert a == place(hier, home, nodes, **args)


@st.composite
def small_trees(draw):
    leaves = draw(st.integers(1, 9))
    order = draw(st.permutations(range(leaves)))
    hier = build_tree(order, draw(st.integers(2, 4)))
    home = [f"n{draw(st.integers(0, 2))}" for _ in range(leaves)]
    return hier, home


@given(small_trees())
@settings(max_examples=150, deadline=None)
def test_partial_bytes_minimal_against_brute_force(tree):
    hier, home = tree
    nodes = nodes_of([16, 16, 16])  # everything fits at home
    p = place(hier, home, nodes, leaf_update_bytes=50 * MB, partial_bytes=8 * MB)
    assert p.leaf_node == tuple(home) and p.spilled == () and p.update_bytes_crossing == 0
    brute = min(cross_node_bytes(h, home, home, [0] * hier.leaves, 8 * MB)[1] for h in all_rehostings(hier))
    assert p.partial_bytes_crossing == brute
    assert p.level_nodes == level_nodes(p.hierarchy, p.leaf_node)


def test_one_node_crosses_nothing():
    hier = plan_static(13, 3)
    p = place(hier, ["a"] * 13, [Node("a", 16, GiB, GiB)], leaf_update_bytes=10 * MB, partial_bytes=MB)
    assert p.cross_node_bytes == 0 and p.hierarchy == hier and p.top_node() == "a"


def test_parent_goes_to_the_majority_of_its_children():
    # leaf 0 alone on b, leaves 1..3 on a: the parent must not stay on leaf 0
    hier = plan_static(4, 4)
    nodes = [Node("a", 8, GiB, GiB), Node("b", 8, GiB, GiB)]
    p = place(hier, ["b", "a", "a", "a"], nodes, partial_bytes=8 * MB)
    assert p.top_node() == "a" and p.partial_bytes_crossing == 8 * MB
    assert p.hierarchy.levels[1][0][0] in (1, 2, 3)
    assert p.hierarchy.host(1, 0) != 0  # the dispatcher must finalise at host(depth-1, 0), not leaf 0


def test_only_partials_cross_in_a_two_node_tree():
    # 4 leaves per node, fan-in 4: one partial crosses, no update does
    hier = plan_static(8, 4)
    nodes = [Node("a", 4, GiB, GiB), Node("b", 4, GiB, GiB)]
    p = place(hier, ["a"] * 4 + ["b"] * 4, nodes, leaf_update_bytes=100 * MB, partial_bytes=8 * MB)
    assert (p.update_bytes_crossing, p.partial_bytes_crossing) == (0, 8 * MB)


def test_spill_takes_the_lightest_leaves_to_the_best_fit_node():
    hier = plan_static(4, 4)
    nodes = [Node("a", 2, GiB, GiB), Node("big", 8, GiB, GiB), Node("snug", 2, GiB, GiB)]
    bytes_ = [40 * MB, 10 * MB, 30 * MB, 20 * MB]
    p = place(hier, ["a"] * 4, nodes, leaf_update_bytes=bytes_, partial_bytes=8 * MB)
    assert p.leaf_node == ("a", "snug", "a", "snug")  # leaves 1 and 3 bring the fewest bytes; snug fits tightest
    assert p.update_bytes_crossing == 30 * MB
    assert p.top_node() == "a" and p.partial_bytes_crossing == 16 * MB  # 2-2 tie: the original host (leaf 0) stays


def test_shm_budget_binds():
    hier = plan_static(3, 2)
    nodes = [Node("a", 16, 64 * GiB, 2 * GiB), Node("b", 16, 64 * GiB, 4 * GiB)]
    p = place(hier, ["a"] * 3, nodes, Resources(cores=1, shm_bytes=GiB), partial_bytes=MB)
    assert p.leaf_node.count("a") == 2 and p.leaf_node.count("b") == 1
    with pytest.raises(PlacementError, match="do not fit"):
        place(plan_static(7, 2), ["a"] * 7, nodes, Resources(cores=1, shm_bytes=GiB))
    with pytest.raises(PlacementError, match="not among the nodes"):
        place(hier, ["x"] * 3, nodes)


def test_random_baseline_is_seeded_and_counts_what_crosses():
    nodes = [Node(n, 4, 0, 0) for n in ("a", "b", "c")]
    hier = build_tree(range(6), 2)
    home = ("a", "a", "b", "b", "c", "c")
    one = random_placement(hier, home, nodes, seed=7, leaf_update_bytes=100, partial_bytes=10)
    assert one == random_placement(hier, home, nodes, seed=7, leaf_update_bytes=100, partial_bytes=10)
    assert one.update_bytes_crossing == 100 * sum(n != h for n, h in zip(one.leaf_node, home))
    assert (one.update_bytes_crossing, one.partial_bytes_crossing) == cross_node_bytes(
        hier, one.leaf_node, home, [100] * 6, 10)
    local = place(hier, home, nodes, leaf_update_bytes=100, partial_bytes=10)
    draws = [random_placement(hier, home, nodes, seed=s, leaf_update_bytes=100, partial_bytes=10)
             for s in range(20)]
    assert all(local.cross_node_bytes <= d.cross_node_bytes for d in draws)


def test_tree_over_a_subset_of_leaves():
    h = build_tree([4, 1, 3], 2, leaves=6)
    assert h.leaves == 6 and h.levels[1] == ((4, 1), (3,)) and h.host(h.depth - 1, 0) == 4
    single = build_tree([3], 2, leaves=6)
    assert single.host(single.depth - 1, 0) == 3
    with pytest.raises(ValueError):
        build_tree([1, 1], 2, leaves=3)
    with pytest.raises(ValueError):
        build_tree([5], 2, leaves=3)
