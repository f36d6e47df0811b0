"""The control plane's vocabulary: immutable, typed data shared by planner, placement and autoscaler.

Pure data plus arithmetic on it. Both runtimes (local processes, Ray actors)
describe their world with these types and execute the decisions the policies
return in them, which is how the same policy code drives both. Times are
seconds on whatever monotonic clock the caller uses; sizes are bytes.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Mapping

_EPS = 1e-9


# -- resources and nodes -------------------------------------------------------------
@dataclass(frozen=True)
class Resources:
    """A vector of capacities or demands; compared dimension by dimension."""

    cores: float = 0.0
    memory_bytes: int = 0
    shm_bytes: int = 0

    def __add__(self, o: Resources) -> Resources:
        return Resources(self.cores + o.cores, self.memory_bytes + o.memory_bytes, self.shm_bytes + o.shm_bytes)

    def __sub__(self, o: Resources) -> Resources:
        return Resources(self.cores - o.cores, self.memory_bytes - o.memory_bytes, self.shm_bytes - o.shm_bytes)

    def fits_in(self, capacity: Resources) -> bool:
        return (self.cores <= capacity.cores + _EPS and self.memory_bytes <= capacity.memory_bytes
                and self.shm_bytes <= capacity.shm_bytes)

    def copies_in(self, capacity: Resources) -> int:
        """How many of this demand fit in ``capacity`` (the binding dimension decides)."""
        pairs = [(self.cores, capacity.cores), (self.memory_bytes, capacity.memory_bytes),
                 (self.shm_bytes, capacity.shm_bytes)]
        if all(d <= 0 for d, _ in pairs):
            raise ValueError("an instance's demand must be positive in at least one dimension")
        return max(0, min(math.floor(c / d + _EPS) for d, c in pairs if d > 0))


@dataclass(frozen=True)
class Node:
    """A machine that can host aggregator functions and a gateway.

    The figures are what aggregator functions may use (leave the gateway's own
    cores out). ``shm_budget_bytes`` bounds the float64 accumulators there.
    """

    name: str
    cores: float
    memory_bytes: int
    shm_budget_bytes: int

    @property
    def capacity(self) -> Resources:
        return Resources(self.cores, self.memory_bytes, self.shm_budget_bytes)


# -- hierarchy -------------------------------------------------------------------------
@dataclass(frozen=True)
class Hierarchy:
    """Which leaves fold client updates and how partial sums climb to the top.

    Leaves are numbered 0..L-1. Level k>0 groups up to ``fan_in`` nodes of level
    k-1; a parent is *hosted* by its first child: it folds its other children's
    float64 partial sums into that child's accumulator in place, so going up a
    level moves only (children - 1) partials and never allocates a new
    accumulator. The top is hosted by ``host(depth - 1, 0)`` (leaf 0 for
    ``plan_static``) and finalises.
    """

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


# -- planner inputs and output -----------------------------------------------------------
#: Most client updates one fold command carries: one fused pass over the accumulator (the C
#: kernel takes up to 64 inputs; 16 keeps a batch's inputs in the slot budget of small servers).
MAX_BATCH = 16

#: Cores of a machine kept for its gateway's gRPC threads when the planner fills it with leaves.
GATEWAY_CORES = 1


def machine_node(name: str, workers: int, fold_cores: int, cpus: int, shm_budget_bytes: int) -> Node:
    """One machine as the policies see it: the cores its functions may fill (``fold_cores``, or
    all but the gateway's), capped by ``workers``."""
    return Node(name, float(min(workers, fold_cores or max(1, cpus - GATEWAY_CORES))), 0, shm_budget_bytes)


@dataclass(frozen=True)
class CostPriors:
    """Fold costs assumed before any fold was measured (the planner needs numbers for the first round)."""

    update_bytes_per_s: float = 2e9   # one update folded alone: ~2 GB/s of update bytes on one core
    fuse_speedup: float = 2.0         # F of ``FoldCosts``: a batch of many costs ~half per update
    partial_factor: float = 2.0       # a float64 partial is twice an fp32 update's bytes
    finalize_factor: float = 1.0

    def costs(self, update_s: float) -> "FoldCosts":
        return FoldCosts(update_s=update_s, fuse_speedup=self.fuse_speedup,
                         partial_s=self.partial_factor * update_s, finalize_s=self.finalize_factor * update_s)


@dataclass(frozen=True)
class FoldCosts:
    """Measured fold costs (the dispatcher's fold-seconds histogram feeds these).

    ``fuse_speedup`` F >= 1 is the asymptotic per-update speed-up of folding many
    inputs in one pass: a batch of k costs ``single * ((1 - 1/F) + k/F)`` — one
    pass over the accumulator plus k reads (see ``planner.batch_seconds``).
    """

    update_s: float                 # one client update folded alone
    fuse_speedup: float = 1.0
    partial_s: float | None = None  # one child's float64 partial folded alone; None = update_s
    finalize_s: float = 0.0         # divide by total weight, cast, write the result
    max_batch: int = MAX_BATCH      # most updates per fold command

    def __post_init__(self):
        if not self.update_s > 0:
            raise ValueError(f"update_s must be > 0, got {self.update_s}")
        if self.fuse_speedup < 1:
            raise ValueError(f"fuse_speedup must be >= 1, got {self.fuse_speedup}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    @property
    def partial(self) -> float:
        return self.update_s if self.partial_s is None else self.partial_s


@dataclass(frozen=True)
class Load:
    """What a round is expected to bring.

    ``node_share`` maps node name -> share of updates arriving at that node's
    gateway (normalised; nodes absent get none). Empty: shares proportional to
    each node's aggregator slots.
    """

    expected_clients: int
    arrival_rate_per_s: float
    node_share: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannerPolicy:
    max_utilisation: float = 0.8   # keep-up margin: per-node arrivals <= this x leaves' service rate
    latency_slack: float = 0.05    # accept up to this much extra latency for fewer leaves
    max_leaves: int = 256
    replan_gain: float = 0.10      # mid-round: adopt a new plan only if it is this much faster


@dataclass(frozen=True)
class LatencyBreakdown:
    """Predicted post-arrival latency: last leaf's tail + partial folds on the critical path + finalize."""

    leaf_tail_s: float
    tree_s: float
    finalize_s: float

    @property
    def total_s(self) -> float:
        return self.leaf_tail_s + self.tree_s + self.finalize_s


@dataclass(frozen=True)
class Plan:
    hierarchy: Hierarchy
    leaf_home: tuple[str, ...]     # node whose gateway feeds each leaf (route its updates there)
    latency: LatencyBreakdown
    utilisation: float             # worst node: arrivals / (its leaves x leaf service rate)
    service_rate_per_s: float      # all leaves together, updates/s
    arrival_rate_per_s: float
    keeps_up: bool                 # utilisation <= policy.max_utilisation

    @property
    def leaves(self) -> int:
        return self.hierarchy.leaves

    @property
    def fan_in(self) -> int:
        return self.hierarchy.fan_in

    @property
    def depth(self) -> int:
        return self.hierarchy.depth

    def leaves_per_node(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.leaf_home:
            out[n] = out.get(n, 0) + 1
        return out

    def leaves_on(self, node: str) -> tuple[int, ...]:
        return tuple(i for i, n in enumerate(self.leaf_home) if n == node)


# -- placement output ------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    hierarchy: Hierarchy                      # same groups, each parent re-hosted on its best child
    leaf_node: tuple[str, ...]                # where each leaf's function runs
    level_nodes: tuple[tuple[str, ...], ...]  # node of every hierarchy node, by level
    spilled: tuple[int, ...]                  # leaves placed off their home node (their updates cross)
    update_bytes_crossing: int
    partial_bytes_crossing: int

    @property
    def cross_node_bytes(self) -> int:
        return self.update_bytes_crossing + self.partial_bytes_crossing

    def top_node(self) -> str:
        return self.level_nodes[-1][0]


# -- instances, autoscaling, reuse ---------------------------------------------------------------
class InstanceState(str, enum.Enum):
    COLD = "cold"  # being started; not ready yet
    WARM = "warm"  # ready, holds a role in an open round, waiting for work (not stoppable)
    BUSY = "busy"  # running a command
    IDLE = "idle"  # ready, no role: reusable; stopped after the keep-alive


@dataclass(frozen=True)
class Instance:
    id: str
    node: str
    state: InstanceState
    role: str = ""          # "leaf" | "middle" | "top"; for an IDLE instance the last one it served
    last_used: float = 0.0  # when it last finished work (the keep-alive clock)


@dataclass(frozen=True)
class RoleRequest:
    key: str   # the caller's handle, e.g. "r7/leaf3"
    role: str
    node: str


@dataclass(frozen=True)
class RoleAssignment:
    reuse: Mapping[str, str]          # request key -> warm instance id taking that role
    cold: tuple[RoleRequest, ...]     # requests that need a new instance (on request.node)

    @property
    def warm_share(self) -> float:
        n = len(self.reuse) + len(self.cold)
        return len(self.reuse) / n if n else 1.0


@dataclass(frozen=True)
class ScalePolicy:
    keep_alive_s: float = 30.0         # an idle instance lives this long before it may be stopped
    stabilization_s: float = 10.0      # scale down only to the highest target seen in this window
    target_utilisation: float = 0.7    # instances = arrivals / (this x per-instance service rate)
    drain_target_s: float = 0.5        # enough instances to drain the backlog within this
    min_instances: int = 0             # 0 = scale to zero
    max_instances: int = 64

    def __post_init__(self):
        if not 0 < self.target_utilisation <= 1:
            raise ValueError("target_utilisation must be in (0, 1]")
        if self.min_instances < 0 or self.max_instances < max(1, self.min_instances):
            raise ValueError("need 0 <= min_instances <= max_instances and max_instances >= 1")
        if self.keep_alive_s < 0 or self.stabilization_s < 0 or self.drain_target_s <= 0:
            raise ValueError("keep_alive_s, stabilization_s must be >= 0 and drain_target_s > 0")


@dataclass(frozen=True)
class Observation:
    """One pool's present (a node, or the whole machine for the local runtime)."""

    instances: tuple[Instance, ...]
    arrival_rate_per_s: float = 0.0          # e.g. an EWMA of accepted updates
    queue_depth: int = 0                     # updates waiting or being folded
    required: int = 0                        # instances open rounds' plans hold (leaves + roles)
    service_rate_per_instance: float = 0.0   # updates/s one instance sustains (planner.leaf_service_rate)


@dataclass(frozen=True)
class AutoscalerState:
    """What the autoscaler remembers between calls: recent targets, newest last, strictly decreasing."""

    history: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True)
class ScaleDecision:
    start: int                  # cold-start this many instances now
    stop: tuple[str, ...]       # stop these idle instances
    target: int                 # instances wanted right now
    floor: int                  # highest target within the stabilization window (scale-down limit)
    reason: str
    state: AutoscalerState      # pass to the next decide()

    @property
    def is_event(self) -> bool:
        return self.start > 0 or bool(self.stop)
