"""Hierarchy plans: which leaves fold client updates and how partial sums climb to the top.

A plan is pure data. Leaves are numbered 0..L-1. Level k>0 groups up to
``fan_in`` nodes of level k-1; a parent is *hosted* by its first child: it
folds its other children's float64 partial sums into that child's accumulator
in place, so going up a level moves only (fan_in - 1) partials and never
allocates a new accumulator. The top is hosted by leaf 0 and finalises.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hierarchy:
    leaves: int
    fan_in: int
    #: levels[k][j] = indices (into level k-1) of node j's children; levels[0] is empty.
    levels: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def depth(self) -> int:
        return len(self.levels)

    def host(self, level: int, index: int) -> int:
        """The leaf whose accumulator and function carry node (level, index)."""
        while level > 0:
            index = self.levels[level][index][0]
            level -= 1
        return index

    def parent(self, level: int, index: int) -> tuple[int, int] | None:
        if level + 1 >= self.depth:
            return None
        for j, kids in enumerate(self.levels[level + 1]):
            if index in kids:
                return level + 1, j
        raise AssertionError("unreachable")

    def describe(self) -> str:
        widths = [self.leaves] + [len(lv) for lv in self.levels[1:]]
        return " -> ".join(str(w) for w in widths) + f" (fan-in {self.fan_in}, depth {self.depth})"


def plan_static(leaves: int, fan_in: int) -> Hierarchy:
    """A balanced tree over ``leaves`` leaves with at most ``fan_in`` children per parent."""
    if leaves < 1:
        raise ValueError(f"need at least one leaf, got {leaves}")
    if fan_in < 2 and leaves > 1:
        raise ValueError(f"fan-in must be >= 2 to join {leaves} leaves, got {fan_in}")
    levels: list[tuple[tuple[int, ...], ...]] = [()]
    width = leaves
    while width > 1:
        groups = tuple(tuple(range(i, min(i + fan_in, width))) for i in range(0, width, fan_in))
        levels.append(groups)
        width = len(groups)
    return Hierarchy(leaves, max(fan_in, 1), tuple(levels))


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
