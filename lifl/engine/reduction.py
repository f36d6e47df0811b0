"""The eager reduction of one round, as a pure state machine: no threads, no I/O, no metrics.

A round's updates are folded into float64 accumulators held by its *leaves*; when the round
closes, each parent of the tree folds its children's partial sums into its host leaf's
accumulator as soon as those children are complete, and the top's host finalises
Σwᵢxᵢ / Σwᵢ. This module decides *what* to fold *where* and *when*; the engine turns its
commands into function calls and feeds the replies back with :meth:`Reduction.commit`.

Invariants that make it exact under any completion order, replays and failures:

* a leaf has at most one command in flight, and a command names the generation it writes
  (``gen``, never reused) and the one it starts from (``base``): a command re-sent after its
  function died resumes from the accumulator's journal (``fold.Journal``) and folds nothing twice;
* only a commit changes state, and a commit of anything but the leaf's command in flight (a
  duplicate or stale reply) changes nothing;
* an update's slot is released only when the fold that read it is committed;
* parents start only after the round is closed and their host leaf is complete, so an
  accumulator is never read while it is written.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from ..control.model import MAX_BATCH, Hierarchy
from ..fold import span_bounds
from ..control.planner import build_tree, route_leaf


@dataclass(frozen=True)
class Update:
    slot: str        # where the update's bytes are (a shared-memory slot name)
    weight: float
    client: str


@dataclass(frozen=True)
class Fold:
    """Fold client updates, or children's partial sums, into ``leaf``'s accumulator: from
    generation ``base`` (0: from zero) to ``gen``."""

    round: int
    leaf: int
    gen: int
    base: int
    updates: tuple[Update, ...] = ()
    children: tuple[int, ...] = ()                 # leaves whose accumulators are folded in
    parent: tuple[int, int] | None = None          # the tree node (level, index) a partial fold serves

    @property
    def kind(self) -> str:
        return "update" if self.updates else "partial"


@dataclass(frozen=True)
class Finalize:
    """Write ``leaf``'s accumulator ÷ ``weight`` as the round's result. With ``updates`` or
    ``children`` it first folds them in (from generation ``base`` to ``gen``, like a
    :class:`Fold`) in the same pass: the round's last fold and its finalize as one command."""

    round: int
    leaf: int
    weight: float
    gen: int = 0
    base: int = 0
    updates: tuple[Update, ...] = ()
    children: tuple[int, ...] = ()
    span: tuple[int, int] | None = None   # one span of a flat finalize: elements [e0, e1) only
    kind: str = "finalize"


Command = Fold | Finalize


class Phase(enum.Enum):
    OPEN = "open"            # updates arrive and are folded at the leaves
    CLOSED = "closed"        # no more updates: leaves drain, parents fold
    DONE = "done"            # the top is finalised


@dataclass
class Leaf:
    index: int
    node: str = "local"      # where its accumulator and function are
    home: str = "local"      # whose gateway feeds it
    gen: int = 0             # committed generation (0: nothing folded, logically zero)
    pending: list[Update] = field(default_factory=list)
    in_flight: Command | None = None
    folded: int = 0          # client updates committed into it
    weight: float = 0.0      # their total weight, plus that of the partials folded in
    clients: list[str] = field(default_factory=list)   # whose updates were routed here
    contains: set[int] = field(default_factory=set)    # leaves whose updates the accumulator holds
    lost: bool = False

    @property
    def fresh(self) -> bool:
        return self.gen == 0

    @property
    def quiet(self) -> bool:
        return not self.pending and self.in_flight is None


@dataclass(frozen=True)
class Loss:
    """What a lost node took from a round: the clients whose updates are gone (they may push again)."""

    clients: tuple[str, ...]


class Reduction:
    """One round's tree. ``gens`` yields accumulator generations, never reused across rounds."""

    def __init__(self, round_id: int, hier: Hierarchy, leaves: Sequence[tuple[str, str]],
                 gens: Iterator[int] | None = None, lazy: bool = False, numel: int = 0, flat_on: str = ""):
        """``lazy``: leaves fold nothing until the round closes (the ``fold_when = "lazy"``
        ablation: collect, then aggregate). ``numel`` and ``flat_on`` (a node, where the result is
        written): a round whose leaves are all on that node ends in a *flat finalize*: once no fold is in flight, every leaf
        that holds updates writes one span of the result from all sums and pending updates, in
        parallel, instead of the tree's levels one after another (on one node the tree saves no
        traffic; it only serialises the last step)."""
        self.round = round_id
        self.lazy = lazy
        self.numel, self.flat_on = numel, flat_on
        self._spans_left: set[int] = set()
        self.hier = hier
        self.leaves = [Leaf(i, node, home) for i, (node, home) in enumerate(leaves)]
        self.phase = Phase.OPEN
        self._gens = gens if gens is not None else itertools.count(1)
        self._cursor = 0
        self._done: set[tuple[int, int]] = set()            # tree nodes complete
        self._folded: dict[tuple[int, int], set[int]] = {}  # children folded into each parent
        self._finalizing = False
        self.needs_rebuild = False
        if len(self.leaves) < hier.leaves:
            raise ValueError(f"{len(self.leaves)} leaves for a tree of {hier.leaves}")

    # -- arrivals -----------------------------------------------------------------------
    def route(self, home: str) -> int:
        """The leaf for the next update from ``home``'s gateway: the least loaded of that node's
        leaves (any live leaf if it has none), ties round-robin."""
        cands = ([lf for lf in self.leaves if lf.home == home and not lf.lost]
                 or [lf for lf in self.leaves if not lf.lost])
        if not cands:
            raise ValueError(f"round {self.round} has no live leaf")
        i = route_leaf([len(lf.pending) for lf in cands], [lf.in_flight is not None for lf in cands],
                       self._cursor % len(cands))
        self._cursor = (i + 1) % len(cands)
        return cands[i].index

    def add(self, leaf: int, update: Update) -> None:
        if self.phase is not Phase.OPEN:
            raise ValueError(f"round {self.round} is {self.phase.value}: no more updates")
        lf = self.leaves[leaf]
        if lf.lost:
            raise ValueError(f"leaf {leaf} is lost")
        lf.pending.append(update)
        lf.clients.append(update.client)

    def take_fold(self, leaf: int) -> Fold | None:
        """The next batch of a leaf's pending updates, if it has some and nothing in flight."""
        lf = self.leaves[leaf]
        if lf.lost or lf.in_flight is not None or not lf.pending or (self.lazy and self.phase is Phase.OPEN):
            return None
        batch, lf.pending = tuple(lf.pending[:MAX_BATCH]), lf.pending[MAX_BATCH:]
        lf.in_flight = Fold(self.round, leaf, next(self._gens), lf.gen, updates=batch)
        return lf.in_flight

    # -- closing and the tree -----------------------------------------------------------------
    def close(self) -> None:
        if self.phase is Phase.OPEN:
            self.phase = Phase.CLOSED

    def ready(self) -> list[Command]:
        """Commands that may start now: parents whose inputs are complete, then the finalize."""
        if self.phase is not Phase.CLOSED or self.needs_rebuild:
            return []
        if self.numel and self.flat_on and not self._finalizing and self._on_flat_node():
            flat = self._flat_finalize()
            if flat is not None:
                return flat
        hier, done, out = self.hier, self._done, []
        top = (hier.depth - 1, 0)
        for lf in self.leaves:
            if lf.index < hier.leaves and lf.quiet and not lf.lost:
                done.add((0, lf.index))
        for level in range(1, hier.depth):
            for j, kids in enumerate(hier.levels[level]):
                node = (level, j)
                if node in done or (level - 1, kids[0]) not in done:
                    continue
                folded = self._folded.setdefault(node, set())
                for k in kids[1:]:  # a child that never received an update adds nothing
                    if (level - 1, k) in done and self.leaves[hier.host(level - 1, k)].fresh:
                        folded.add(k)
                host = self.leaves[hier.host(level, j)]
                ready = tuple(k for k in kids[1:] if (level - 1, k) in done and k not in folded)
                if ready and host.in_flight is None and not self._finalizing:
                    children = tuple(hier.host(level - 1, k) for k in ready)
                    if node == top and len(folded) + len(ready) == len(kids) - 1:
                        host.in_flight = self._finalize(host, children=children)   # the top's last fold
                    else:
                        host.in_flight = Fold(self.round, host.index, next(self._gens), host.gen,
                                              children=children, parent=node)
                    out.append(host.in_flight)
                if len(folded) == len(kids) - 1:
                    done.add(node)
        host = self.leaves[hier.host(*top)]
        if self._finalizing or host.lost:
            return out
        if top in done:
            out.append(self._finalize(host))
        elif hier.depth == 1 and host.in_flight is None and 0 < len(host.pending) <= MAX_BATCH:
            batch, host.pending = tuple(host.pending), []   # one leaf: its last updates and the finalize
            out.append(self._finalize(host, updates=batch))
        return out

    def _on_flat_node(self) -> bool:
        return {lf.node for lf in self.leaves if not lf.lost} == {self.flat_on}

    def _flat_finalize(self) -> list[Command] | None:
        """Spans of the result, one per leaf holding updates, once no command is in flight ([]
        until then); None when fewer than two leaves hold updates (the tree's finalize then)."""
        live = [lf for lf in self.leaves if not lf.lost]
        hosts = [lf for lf in live if lf.gen or lf.pending]
        if len(hosts) < 2:
            return None
        if any(lf.in_flight is not None for lf in live):
            return []
        roots = [lf for lf in live if lf.gen and not any(lf.index in o.contains for o in live if o is not lf)]
        updates = tuple(u for lf in live for u in lf.pending)
        for lf in live:
            lf.pending = []
        weight = sum(lf.weight for lf in roots) + sum(u.weight for u in updates)
        self._finalizing = True
        out = []
        for host, span in zip(hosts, span_bounds(self.numel, len(hosts))):
            host.in_flight = Finalize(self.round, host.index, weight, updates=updates,
                                      children=tuple(lf.index for lf in roots), span=span)
            self._spans_left.add(host.index)
            out.append(host.in_flight)
        return out

    def _finalize(self, host: Leaf, updates: tuple[Update, ...] = (), children: tuple[int, ...] = ()) -> Finalize:
        self._finalizing = True
        weight = host.weight + sum(u.weight for u in updates) + sum(self.leaves[c].weight for c in children)
        gen = next(self._gens) if updates or children else 0
        host.in_flight = Finalize(self.round, host.index, weight, gen, host.gen, updates, children)
        return host.in_flight

    def commit(self, cmd: Command) -> list[str]:
        """A command's function replied that it is done. Returns the update slots now free to
        reuse. A reply that is not the leaf's command in flight (a duplicate, a stale replay)
        changes nothing and frees nothing."""
        lf = self.leaves[cmd.leaf]
        if lf.in_flight != cmd or lf.lost:
            return []
        lf.in_flight = None
        if isinstance(cmd, Finalize):
            self._spans_left.discard(lf.index)
            if self._spans_left:
                return []        # the other spans still read the updates
            self.phase = Phase.DONE
            lf.folded += len(cmd.updates)
            return [u.slot for u in cmd.updates]
        lf.gen = cmd.gen
        lf.contains.add(lf.index)
        if cmd.updates:
            lf.folded += len(cmd.updates)
            lf.weight += sum(u.weight for u in cmd.updates)
            return [u.slot for u in cmd.updates]
        level, j = cmd.parent
        kids = self.hier.levels[level][j]
        for child in cmd.children:
            c = self.leaves[child]
            lf.contains |= c.contains
            lf.weight += c.weight
        self._folded.setdefault(cmd.parent, set()).update(
            k for k in kids[1:] if self.hier.host(level - 1, k) in cmd.children)
        return []

    def abandon(self, cmd: Command, torn: bool = False) -> None:
        """The command will not complete (an input went with a lost node). ``torn``: it may have
        run part way before (its function died mid-command and it was re-sent), so the leaf's
        accumulator holds some pieces with the lost input and some without — no journal can undo
        finished pieces — and the leaf counts as lost: its updates are gone unless another
        accumulator holds them, and the tree is rebuilt over what survives."""
        lf = self.leaves[cmd.leaf]
        if lf.in_flight != cmd:
            return
        lf.in_flight = None
        if isinstance(cmd, Finalize) and cmd.span is not None:   # the flat finalize is called off
            for other in self.leaves:
                if isinstance(other.in_flight, Finalize):
                    other.in_flight = None
            self._spans_left.clear()
        if isinstance(cmd, Finalize):
            self._finalizing = False
            lf.pending[:0] = cmd.updates     # a fused finalize's updates wait again
        if torn and cmd.children and not (isinstance(cmd, Finalize) and cmd.span):  # a span writes no sum
            lf.lost = True
            lf.pending.clear()
            self.needs_rebuild = True

    # -- queries ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def in_flight(self) -> list[Command]:
        return [lf.in_flight for lf in self.leaves if lf.in_flight is not None]

    def backlog(self) -> int:
        """Updates routed to leaves and not yet committed."""
        sent = {u.slot for lf in self.leaves if lf.in_flight is not None for u in lf.in_flight.updates}
        return sum(len(lf.pending) for lf in self.leaves) + len(sent)

    def drain_pending(self) -> list[str]:
        """Drop every update not yet sent to a function (the round failed); returns the slots of
        those on live leaves, to be released (a lost node's went with it)."""
        slots = [u.slot for lf in self.leaves if not lf.lost for u in lf.pending]
        for lf in self.leaves:
            lf.pending.clear()
        return slots

    # -- change of plan ----------------------------------------------------------------------------
    def extend(self, hier: Hierarchy, leaves: Sequence[tuple[str, str]]) -> None:
        """Adopt a new tree mid-round (only while open: no parent has folded yet). Existing leaves
        keep their index and sums; ``leaves`` are the new ones appended after them."""
        if self.phase is not Phase.OPEN:
            raise ValueError("a round's tree changes only while it is open")
        self.leaves += [Leaf(len(self.leaves) + i, node, home) for i, (node, home) in enumerate(leaves)]
        if hier.leaves != len(self.leaves):
            raise ValueError(f"the new tree has {hier.leaves} leaves, the round {len(self.leaves)}")
        self.hier = hier

    def lose(self, node: str) -> bool:
        """A node is gone with its functions and accumulators. Its leaves' pending updates and
        commands in flight are dropped (their slots were on that node). Returns whether anything
        of this round was there; the tree is rebuilt by :meth:`rebuild` once quiet."""
        lost = [lf for lf in self.leaves if lf.node == node and not lf.lost]
        for lf in lost:
            lf.lost, lf.in_flight = True, None
            lf.pending.clear()
        if lost and self.phase is not Phase.DONE:
            self.needs_rebuild = True
        return bool(lost)

    def can_rebuild(self) -> bool:
        """While open, at once; once closed, when no command is in flight (a partial fold may
        still be reading a lost child)."""
        return self.needs_rebuild and (self.phase is Phase.OPEN or not self.in_flight())

    def rebuild(self, fan_in: int, rank: Callable[[Leaf], object] = lambda lf: 0) -> Loss:
        """Rebuild the tree over the accumulators that survive; return what was lost for good.

        Survivors are the live leaves not already folded into another live leaf; an update is
        gone only if no survivor holds it. ``rank`` orders the roots (keeping a node's leaves
        together, so tree groups rarely straddle nodes)."""
        self.needs_rebuild = False
        alive = [lf for lf in self.leaves if not lf.lost]
        kept = set().union(*(lf.contains for lf in alive)) if alive else set()
        gone: list[str] = []
        for lf in self.leaves:
            if lf.lost and lf.index not in kept:
                gone += lf.clients
                lf.clients.clear()
        if alive:
            roots = [lf for lf in alive if not any(lf.index in o.contains for o in alive if o is not lf)]
            order = sorted((lf.index for lf in roots), key=lambda i: (rank(self.leaves[i]), i))
            self.hier = build_tree(order, max(2, fan_in), leaves=len(self.leaves))
        self._done, self._folded, self._finalizing = set(), {}, False
        self._spans_left.clear()
        return Loss(tuple(gone))

    @property
    def alive(self) -> bool:
        return any(not lf.lost for lf in self.leaves)
