"""A typed, read-only view of the engine at one moment: what operators, the status RPC,
metrics and tests read instead of the engine's live objects."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FunctionView:
    id: str
    pid: int
    node: str
    role: str          # idle, leaf, middle, top
    state: str         # control.model.InstanceState value: idle, warm, busy
    busy: bool         # running a command now
    folds: int
    updates_folded: int


@dataclass(frozen=True)
class LeafView:
    index: int
    node: str          # where its accumulator and function are
    home: str          # whose gateway feeds it
    function: str      # id of the function bound to it, "" if none
    lost: bool


@dataclass(frozen=True)
class RoundView:
    job: str
    id: int
    state: str
    accepted: int
    leaves: tuple[LeafView, ...]
    plan: str          # the tree, as the planner described it ("" before one was made)
    partial_bytes_crossing: int = 0   # partial sums the placement predicted to cross nodes


@dataclass(frozen=True)
class EngineSnapshot:
    functions: tuple[FunctionView, ...]
    rounds: tuple[RoundView, ...]
    plan: str          # the last tree the shaper made

    def round(self, rid: int) -> RoundView:
        return next(r for r in self.rounds if r.id == rid)


def function_view(fn) -> FunctionView:
    h = fn.handle
    return FunctionView(h.id, h.pid, fn.node, fn.role, fn.state().value, fn.current is not None, fn.folds,
                        fn.updates_folded)


def round_view(run) -> RoundView:
    r = run.round
    leaves = tuple(LeafView(lf.index, lf.node, lf.home,
                            run.workers[lf.index].handle.id if lf.index in run.workers else "", lf.lost)
                   for lf in run.leaves)
    plan = run.shape.hier.describe() if run.shape is not None else ""
    crossing = run.placement.partial_bytes_crossing if run.placement is not None else 0
    return RoundView(r.job, r.id, r.state.name.lower(), len(r.accepted), leaves, plan, crossing)
