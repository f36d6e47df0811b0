"""The round table: every round's mechanism state, results held for readers, and what is let go.

A finished round keeps only its result (for ``keep_rounds`` rounds, while nobody reads it);
its initial model is let go at once. With no round running (``release_idle_shm``), cached
update slots and accumulators are unlinked too, and functions are told to unmap whatever the
arena unlinked: a segment still mapped is still memory.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from ..control.model import Hierarchy
from ..errors import LiflError, quote
from ..rounds import Round, State, job_name
from ..shm import Arena, Segment
from .reduction import Command, Finalize, Fold, Leaf, Reduction
from .shaping import Shape


@dataclass(frozen=True)
class LeafSegs:
    """A leaf's float64 accumulator and the journal that lets folds into it run in place."""

    acc: Segment
    journal: Segment


@dataclass
class RoundRun:
    """A round's mechanism state around its pure reduction: segments, bound functions, readers."""

    round: Round
    red: Reduction | None = None
    shape: Shape | None = None
    segs: list[LeafSegs] = field(default_factory=list)      # index-aligned with red.leaves
    workers: dict = field(default_factory=dict)             # leaf index -> its PooledFunction
    initial: Segment | None = None
    result: Segment | None = None      # allocated when the top finalises
    from_round: int = 0                # initial is that round's result (shared, not copied)
    done_event: threading.Event = field(default_factory=threading.Event)
    waiters: set = field(default_factory=set)     # events of readers waiting for the result
    tasks_in_flight: int = 0
    readers: int = 0
    released: bool = False
    lost_nodes: set[str] = field(default_factory=set)
    # a server optimizer applied at finalize: {"opt": ServerOptimizer fields, "base": initial model
    # segment, "state": double-buffered state segment, "t": step it follows (fixed at the first send)}
    # an asynchronous job's buffer: also "x_in"/"x_out" (master copies), "w" (Σw), "after" (the
    # previous buffer's round, whose step this one follows: its finalize (or spans) wait, ``parked``)
    step: dict | None = None
    parked: list = field(default_factory=list)

    @property
    def hier(self) -> Hierarchy:
        return self.red.hier

    @property
    def leaves(self) -> list[Leaf]:
        return self.red.leaves if self.red is not None else []

    @property
    def plan(self):
        return self.shape.plan if self.shape is not None else None

    @property
    def placement(self):
        return self.shape.placement if self.shape is not None else None

    @property
    def running(self) -> bool:
        return self.round.state in (State.OPEN, State.AGGREGATING)

    @property
    def finished(self) -> bool:
        return self.round.state in (State.DONE, State.FAILED)

    def finish(self) -> None:
        """The result exists (or never will): wake every reader waiting for it."""
        self.done_event.set()
        for w in list(self.waiters):
            w.set()


@dataclass(frozen=True)
class Forget:
    """A control command: unmap segments the arena unlinked; drop finished rounds' layouts."""

    segments: tuple[str, ...] = ()
    layouts: tuple[int, ...] = ()


@dataclass
class Task:
    """A command queued for or running on a function: a reduction command, or a control op."""

    cmd: "Command | Forget"
    run: RoundRun | None
    attempts: int = 1          # sends so far: a re-sent command may have run part way before

    @property
    def kind(self) -> str:
        return self.cmd.kind if isinstance(self.cmd, (Fold, Finalize)) else "control"

    @property
    def reads_partials(self) -> bool:
        """It reads children's accumulators (which may be on another node)."""
        return isinstance(self.cmd, (Fold, Finalize)) and bool(self.cmd.children)

    def wire(self) -> dict:
        """The JSON command a function reads (``lifl.function``), made afresh at each send: a
        command re-sent to a replacement is the same command."""
        cmd, run = self.cmd, self.run
        if isinstance(cmd, Forget):
            return {"op": "forget", "segments": list(cmd.segments), "layouts": list(cmd.layouts)}
        segs = run.segs[cmd.leaf]
        if isinstance(cmd, Finalize) and cmd.span is not None:   # one span of a flat finalize
            out = {"op": "finalize", "layout": cmd.round, "weight": cmd.weight, "out": run.result.name,
                   "span": list(cmd.span), "partials": [run.segs[c].acc.name for c in cmd.children],
                   "updates": [[u.slot, u.weight] for u in cmd.updates]}
            if run.step is not None:     # each span steps its elements (lifl.serverstep)
                out["step"] = run.step
            return out
        if isinstance(cmd, Finalize):
            out = {"op": "finalize", "layout": cmd.round, "acc": segs.acc.name, "weight": cmd.weight,
                   "out": run.result.name}
            if run.step is not None:
                out["step"] = run.step
            if not (cmd.updates or cmd.children):
                return out
        else:
            out = {"op": "fold", "layout": cmd.round, "acc": segs.acc.name}
        out.update(journal=segs.journal.name, gen=cmd.gen)
        if cmd.base:
            out["from"] = cmd.base
        if cmd.updates:
            out["updates"] = [[u.slot, u.weight] for u in cmd.updates]
        else:
            out["partials"] = [run.segs[c].acc.name for c in cmd.children]
        return out


#: ``cancel(fn)``: have ``fn`` called when whoever waits goes away (gRPC: ``context.add_callback``).
Cancel = Callable[[Callable[[], None]], object]


def wait_result(run: "RoundRun", timeout: float, cancel: Cancel | None) -> bool:
    """Wait up to ``timeout`` for the round's result, woken at once by the round finishing
    (``RoundRun.finish``) or by the waiter going away (``cancel``): no polling."""
    if run.done_event.is_set() or timeout <= 0:
        return run.done_event.is_set()
    wake = threading.Event()
    run.waiters.add(wake)
    try:
        if cancel is not None and cancel(wake.set) is False:   # gRPC: the call already ended
            wake.set()
        if not run.done_event.is_set():   # registered first: a finish in between is not missed
            wake.wait(timeout)
    finally:
        run.waiters.discard(wake)
    return run.done_event.is_set()


class RoundTable:
    """Rounds by id, and the memory finished ones hold. ``forget(names)`` tells every function to
    unmap segments that were unlinked."""

    def __init__(self, arena: Arena, keep_rounds: int, release_idle: bool, forget: Callable[[list[str]], None],
                 on_drop: Callable[[int], None] = lambda rid: None):
        """``on_drop(rid)``: a finished round left the table (durable mode forgets its result)."""
        self.arena, self.keep_rounds, self.release_idle, self._forget = arena, keep_rounds, release_idle, forget
        self.on_drop = on_drop
        self.runs: dict[int, RoundRun] = {}

    def get(self, job: str, rid: int) -> RoundRun:
        """A round of a job; an empty job is ``default`` (never "any job")."""
        job = job_name(job)
        run = self.runs.get(rid)
        if run is None or run.round.job != job:
            raise LiflError("NOT_FOUND", f"round {rid} of job {quote(job)} does not exist on this server")
        return run

    def all(self) -> list[RoundRun]:
        return list(self.runs.values())

    def any_running(self) -> bool:
        return any(r.running for r in self.runs.values())

    def let_go_of_memory(self) -> None:
        """With no round running, unlink cached update slots and accumulators; tell functions."""
        if self.release_idle and not self.any_running():
            self.arena.trim()
        names = self.arena.drain_unlinked()
        if names:
            self._forget(names)

    def evict_old(self) -> None:
        """Forget finished rounds beyond ``keep_rounds``. A finished round lets go of the model it
        was opened with at once (only results are kept): its clients have fetched it, the
        operator has it, and when it was another round's result that round keeps it."""
        finished = [r for r in self.runs.values() if r.finished]
        for run in finished:
            if run.initial is not None and run.readers == 0:
                self.arena.free(run.initial.name)
                run.initial = None
        for run in finished[:-self.keep_rounds] if self.keep_rounds else finished:
            if run.readers == 0 and run.released:
                if run.result is not None:
                    self.arena.recycle_as_slot(run.result.name)
                if run.initial is not None:
                    self.arena.free(run.initial.name)
                del self.runs[run.round.id]
                self.on_drop(run.round.id)
        self.let_go_of_memory()

    @staticmethod
    def initial_of(run: RoundRun) -> Segment:
        rid = run.round.id
        if run.initial is None and run.from_round:
            raise LiflError("NOT_FOUND", f"round {rid} is finished and its initial model was round "
                                         f"{run.from_round}'s result: pull that round's result instead")
        if run.initial is None and run.finished:
            raise LiflError("NOT_FOUND", f"round {rid} is finished and its initial model is no longer "
                                         "kept (only results are, for the last keep_rounds rounds)")
        if run.initial is None:
            raise LiflError("NOT_FOUND", f"round {rid} was opened without an initial model")
        return run.initial

    @staticmethod
    def result_of(run: RoundRun, wait_s: float, cancel: Cancel | None) -> Segment:
        r = run.round
        if not wait_result(run, wait_s, cancel):
            raise LiflError("DEADLINE_EXCEEDED" if wait_s > 0 else "FAILED_PRECONDITION",
                            f"round {r.id} has no result yet (state {r.state.name.lower()}, "
                            f"{len(r.accepted)}/{r.expected} updates); pull with a longer wait")
        if r.state == State.FAILED:
            raise LiflError("FAILED_PRECONDITION", f"round {r.id} failed: {r.detail}")
        return run.result
