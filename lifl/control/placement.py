"""Locality-aware placement of a hierarchy's aggregator functions on nodes.

Why: an update is large and lands in the shared memory of the node whose
gateway received it; folding it there costs no network. So:

1. Leaves go to their home node (the node whose gateway feeds them). When a
   node is full, the leaves with the fewest expected update bytes are spilled,
   each to the node that fits it most tightly (best-fit decreasing, ties by
   ``nodes`` order): only then do whole updates cross nodes.
2. Parents cost no extra instance: a parent is hosted by one of its children
   (the dispatcher folds the others' float64 partials into that child's
   accumulator). Which child hosts decides which partials cross nodes, so the
   children are reordered to put the best host first. "Best" is exact: a
   bottom-up dynamic programme over (tree node, node it sits on) minimises the
   partial bytes crossing nodes in the whole tree; it reduces to "next to the
   majority of its children" for a single level and breaks that rule's ties
   by what the level above needs.

Everything is deterministic: no randomness, no iteration over hashed sets.
The top may move off leaf 0: the caller must finalise at
``placement.hierarchy.host(depth - 1, 0)``.
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

from .model import Hierarchy, Node, Placement, Resources

__all__ = ["PlacementError", "place", "random_placement", "cross_node_bytes", "level_nodes"]


class PlacementError(ValueError):
    """The functions do not fit on the nodes."""


def level_nodes(hier: Hierarchy, leaf_node: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The node of every hierarchy node (a parent sits with its host child), by level."""
    out = [tuple(leaf_node)]
    for level in hier.levels[1:]:
        out.append(tuple(out[-1][kids[0]] for kids in level))
    return tuple(out)


def cross_node_bytes(hier: Hierarchy, leaf_node: Sequence[str], leaf_home: Sequence[str],
                     leaf_update_bytes: Sequence[int], partial_bytes: int) -> tuple[int, int]:
    """(update bytes, partial bytes) that cross nodes for this hierarchy and leaf placement.

    A leaf off its home node pulls all its updates across; each non-host child
    on another node than its parent ships one partial of ``partial_bytes``.
    The result itself is not counted (it is served from the top's node).
    """
    updates = sum(b for n, h, b in zip(leaf_node, leaf_home, leaf_update_bytes) if n != h)
    where = level_nodes(hier, leaf_node)
    partials = sum(partial_bytes for k, level in enumerate(hier.levels[1:], start=1)
                   for j, kids in enumerate(level) for c in kids[1:] if where[k - 1][c] != where[k][j])
    return updates, partials


def _place_leaves(leaf_home: Sequence[str], nodes: Sequence[Node], demand: Resources,
                  used: Mapping[str, Resources], leaf_bytes: Sequence[int]) -> list[str]:
    free = {n.name: n.capacity - used.get(n.name, Resources()) for n in nodes}
    unknown = sorted(set(leaf_home) - set(free))
    if unknown:
        raise PlacementError(f"leaf home node(s) {unknown} are not among the nodes {[n.name for n in nodes]}")
    by_bytes = sorted(range(len(leaf_home)), key=lambda i: (-leaf_bytes[i], i))
    where: list[str | None] = [None] * len(leaf_home)
    for i in by_bytes:  # home first, the heaviest leaves keep their home
        if demand.fits_in(free[leaf_home[i]]):
            where[i] = leaf_home[i]
            free[leaf_home[i]] -= demand
    for i in by_bytes:  # spill, best fit: the node left with the fewest free slots
        if where[i] is not None:
            continue
        fits = [(demand.copies_in(free[n.name] - demand), r, n.name)
                for r, n in enumerate(nodes) if demand.fits_in(free[n.name])]
        if not fits:
            placed = sum(w is not None for w in where)
            raise PlacementError(f"{len(leaf_home)} aggregator functions do not fit: only {placed} slots "
                                 f"for demand {demand} on nodes {[n.name for n in nodes]}; plan fewer leaves")
        target = min(fits)[2]
        where[i] = target
        free[target] -= demand
    return [w for w in where if w is not None]


def _rehost(hier: Hierarchy, leaf_node: Sequence[str], rank: Mapping[str, int], partial_bytes: int) -> Hierarchy:
    """Reorder each group's children so the host minimises partial bytes crossing nodes (exact DP)."""
    # best[k][j][node] = least crossing bytes in the subtree of (k, j) if (k, j) sits on node
    best: list[list[dict[str, int]]] = [[{n: 0} for n in leaf_node]]
    hosts: list[list[dict[str, int]]] = [[]]
    for level in hier.levels[1:]:
        lb, lh = [], []
        for kids in level:
            child = [best[-1][c] for c in kids]
            floor = [min(d.values()) for d in child]
            costs: dict[str, int] = {}
            pick: dict[str, int] = {}
            for node in sorted({n for d in child for n in d}, key=rank.__getitem__):
                other = [min(d.get(node, math.inf), m + partial_bytes) for d, m in zip(child, floor)]
                p = min((p for p, d in enumerate(child) if node in d), key=lambda p: (child[p][node] - other[p], p))
                costs[node] = sum(other) - other[p] + child[p][node]
                pick[node] = p
            lb.append(costs)
            lh.append(pick)
        best.append(lb)
        hosts.append(lh)
    top = best[-1][0]
    on = [min(top, key=lambda n: (top[n], rank[n]))]  # nodes of the current level, top-down
    levels: list[tuple[tuple[int, ...], ...]] = [()] * hier.depth
    for k in range(hier.depth - 1, 0, -1):
        below: dict[int, str] = {}
        groups = []
        for j, kids in enumerate(hier.levels[k]):
            node, p = on[j], hosts[k][j][on[j]]
            below[kids[p]] = node
            for q, c in enumerate(kids):
                if q != p:
                    d = best[k - 1][c]
                    below[c] = min(d, key=lambda n: (d[n] + (n != node) * partial_bytes, n != node, rank[n]))
            groups.append((kids[p],) + kids[:p] + kids[p + 1:])
        levels[k] = tuple(groups)
        on = [below[i] for i in range(len(below))]
    return Hierarchy(hier.leaves, hier.fan_in, tuple(levels))


def place(hier: Hierarchy, leaf_home: Sequence[str], nodes: Sequence[Node], demand: Resources = Resources(cores=1.0),
          *, leaf_update_bytes: Sequence[int] | int = 0, partial_bytes: int = 0,
          used: Mapping[str, Resources] | None = None) -> Placement:
    """Place every leaf function, re-host every parent, and estimate the bytes that cross nodes.

    ``leaf_home[i]``: node whose gateway feeds leaf i (``Plan.leaf_home``).
    ``leaf_update_bytes``: bytes of updates each leaf is expected to fold (one
    int for all), used to choose which leaves to spill and to count crossings.
    ``partial_bytes``: one float64 partial sum (numel * 8). ``used``: what
    instances of other rounds/jobs already hold on each node.
    Raises ``PlacementError`` when the leaves do not fit on all nodes together.
    """
    if len(leaf_home) != hier.leaves:
        raise ValueError(f"leaf_home has {len(leaf_home)} entries for {hier.leaves} leaves")
    lb = [leaf_update_bytes] * hier.leaves if isinstance(leaf_update_bytes, int) else list(leaf_update_bytes)
    if len(lb) != hier.leaves:
        raise ValueError(f"leaf_update_bytes has {len(lb)} entries for {hier.leaves} leaves")
    rank = {n.name: r for r, n in enumerate(nodes)}
    if len(rank) != len(nodes):
        raise ValueError("node names must be unique")
    leaf_node = _place_leaves(leaf_home, nodes, demand, used or {}, lb)
    rehosted = _rehost(hier, leaf_node, rank, partial_bytes)
    up, pp = cross_node_bytes(rehosted, leaf_node, leaf_home, lb, partial_bytes)
    return Placement(rehosted, tuple(leaf_node), level_nodes(rehosted, leaf_node),
                     tuple(i for i, (n, h) in enumerate(zip(leaf_node, leaf_home)) if n != h), up, pp)


def random_placement(hier: Hierarchy, leaf_home: Sequence[str], nodes: Sequence[Node], seed: int, *,
                     leaf_update_bytes: Sequence[int] | int = 0, partial_bytes: int = 0) -> Placement:
    """Each leaf on a node drawn at random (seeded), parents left on their first child: the
    locality-blind baseline that ``place`` is measured against. Ignores capacity."""
    if len(leaf_home) != hier.leaves:
        raise ValueError(f"leaf_home has {len(leaf_home)} entries for {hier.leaves} leaves")
    lb = [leaf_update_bytes] * hier.leaves if isinstance(leaf_update_bytes, int) else list(leaf_update_bytes)
    rng = random.Random(seed)  # nosec B311  # the seeded random-placement baseline, not a secret
    leaf_node = tuple(rng.choice(nodes).name for _ in range(hier.leaves))
    up, pp = cross_node_bytes(hier, leaf_node, leaf_home, lb, partial_bytes)
    return Placement(hier, leaf_node, level_nodes(hier, leaf_node),
                     tuple(i for i, (n, h) in enumerate(zip(leaf_node, leaf_home)) if n != h), up, pp)
