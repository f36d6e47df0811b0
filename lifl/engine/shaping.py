"""Tree shaping: a round's hierarchy and where its leaves and parents run.

It gathers the inputs (nodes, measured costs or their priors, the arrival estimate) and calls
the pure policies — ``control.planner`` for the shape (elastic or static) and
``control.placement`` for the nodes — and returns their decision as a :class:`Shape`. It
allocates nothing and starts nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..control.model import (CostPriors, Hierarchy, Load, Node, PlannerPolicy, Resources)
from ..control.placement import place, random_placement
from ..control.planner import build_tree, plan_elastic, plan_static, replan
from ..layout import Layout
from .load import LoadEstimator


@dataclass(frozen=True)
class Shape:
    hier: Hierarchy
    homes: tuple[str, ...]     # whose gateway feeds each leaf
    nodes: tuple[str, ...]     # where each leaf's accumulator and function are
    plan: object = None        # the elastic planner's plan (None: static)
    placement: object = None   # multi-node placement (None: one machine)


class TreeShaper:
    """``nodes()``: the live nodes as the policies see them. On one node, ``config.leaves`` caps
    the tree and no placement is needed; on several it is a per-node cap and ``control.placement``
    puts leaves and parents on nodes."""

    def __init__(self, config, nodes: Callable[[], Sequence[Node]], priors: CostPriors = CostPriors()):
        self.config, self._nodes, self.priors = config, nodes, priors
        self.last_plan = ""

    def nodes(self) -> list[Node]:
        return list(self._nodes())

    def _inputs(self, expected: int, layout: Layout, deadline_s: float, load: LoadEstimator):
        update_s = load.fold_s or layout.total_size / self.priors.update_bytes_per_s
        costs = self.priors.costs(update_s)
        rate = load.arrivals_per_s or load.last_round_rate or expected / (deadline_s or 10.0)
        nodes = self.nodes()
        if len(nodes) > 1:  # leaves up to config.leaves per node; arrivals split as last round's were
            names = {m.name for m in nodes}
            share = {n: v for n, v in load.node_share.items() if n in names}
            policy = PlannerPolicy(max_leaves=min(self.config.leaves * len(nodes), expected))
            return Load(expected, rate, share), costs, nodes, policy
        policy = PlannerPolicy(max_leaves=min(self.config.leaves, self.config.workers, expected))
        return Load(expected, rate), costs, nodes, policy

    def _demand(self) -> Resources:
        return Resources(cores=self.config.function_cpus)

    def _place(self, hier: Hierarchy, home: Sequence[str], layout: Layout, expected: int, seed: int):
        nodes = self.nodes()
        per_leaf = layout.total_size * max(1, round(expected / len(home)))
        if self.config.placement == "random":
            return random_placement(hier, list(home), nodes, seed, leaf_update_bytes=per_leaf,
                                    partial_bytes=layout.numel * 8)
        return place(hier, list(home), nodes, Resources(cores=self.config.function_cpus),
                     leaf_update_bytes=per_leaf, partial_bytes=layout.numel * 8)

    def shape(self, round_id: int, expected: int, layout: Layout, deadline_s: float, load: LoadEstimator) -> Shape:
        """A new round's tree (elastic or the configured static one), placed on nodes."""
        plan = None
        if self.config.planner != "static":
            inp, costs, nodes, policy = self._inputs(expected, layout, deadline_s, load)
            plan = plan_elastic(inp, costs, nodes, self._demand(), policy=policy)
            self.last_plan = plan.hierarchy.describe()
        names = [n.name for n in self.nodes()]
        if len(names) == 1:
            hier = plan.hierarchy if plan is not None else plan_static(
                min(self.config.leaves, self.config.workers, expected), self.config.fan_in)
            here = (names[0],) * hier.leaves
            return Shape(hier, here, here, plan)
        if plan is None:  # static: config.leaves per node, the nodes' leaves grouped together
            home = [n for n in names for _ in range(self.config.leaves)][:max(len(names), expected)]
            hier = build_tree(sorted(range(len(home)), key=lambda i: (names.index(home[i]), i)), self.config.fan_in)
        else:
            home, hier = list(plan.leaf_home), plan.hierarchy
        placement = self._place(hier, home, layout, expected, round_id)
        per_node: dict[str, int] = {}
        for n in placement.leaf_node:
            per_node[n] = per_node.get(n, 0) + 1
        self.last_plan = (f"{placement.hierarchy.describe()} on {', '.join(f'{n}:{c}' for n, c in sorted(per_node.items()))}"
                          f"; {placement.partial_bytes_crossing + placement.update_bytes_crossing} bytes to cross nodes")
        return Shape(placement.hierarchy, tuple(home), tuple(placement.leaf_node), plan, placement)

    def reshape(self, current: Shape, round_id: int, expected: int, received: int, layout: Layout,
                deadline_s: float, load: LoadEstimator, leaf_nodes: Sequence[str]) -> Shape | None:
        """Mid-round: a new plan when the measured arrival rate makes it worth it, else None.
        Existing leaves keep their index and node (their sums stay valid); new ones come after."""
        if current.plan is None or not load.arrivals_per_s:
            return None
        inp, costs, nodes, policy = self._inputs(expected, layout, deadline_s, load)
        inp = Load(expected, load.arrivals_per_s, inp.node_share)
        new = replan(current.plan, inp, costs, nodes, self._demand(), policy=policy, received=received)
        if new is current.plan:
            return None
        home = tuple(new.leaf_home)
        if len(nodes) > 1:
            placement = self._place(new.hierarchy, home, layout, expected, round_id)
            if any(placement.leaf_node[i] != n for i, n in enumerate(leaf_nodes)):
                return None  # it would move leaves that already hold sums: keep the current plan
            shape = Shape(placement.hierarchy, home, tuple(placement.leaf_node), new, placement)
        else:
            shape = Shape(new.hierarchy, home, home, new)
        self.last_plan = new.hierarchy.describe() + " (re-planned mid-round)"
        return shape

