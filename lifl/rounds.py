"""Round lifecycle: open -> aggregating -> done | failed, as a pure state machine.

It decides, it does not act: the dispatcher asks it whether an update may start,
records what was accepted, and learns when to close. Close rules:

* all expected updates accepted -> close and aggregate them;
* deadline passed with at least ``quorum`` accepted -> close, aggregate those,
  cancel streams still in flight;
* deadline passed below quorum -> fail (updates discarded);
* an explicit close (admin) -> like a deadline; an abort -> fail.
Updates for an unknown, closed or failed round are refused.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from .errors import LiflError, quote
from .layout import Layout

DEFAULT_JOB = "default"
MAX_ID_CHARS = 256          # job names and client ids longer than this are refused
MAX_WEIGHT = float(2**53)   # an update's weight (its example count): beyond this float64 counts are inexact


def job_name(job: str) -> str:
    """The job a request names: empty means ``default`` in every method, never "any job"."""
    if len(job) > MAX_ID_CHARS:
        raise LiflError("INVALID_ARGUMENT", f"job name {quote(job)} is longer than {MAX_ID_CHARS} characters")
    return job or DEFAULT_JOB


def check_weight(weight: float) -> None:
    """An update's weight must be a positive, finite example count (at most 2**53)."""
    if not (0 < weight <= MAX_WEIGHT):
        raise LiflError("INVALID_ARGUMENT", f"num_examples must be a positive number of at most 2**53, got {weight}")


class State(enum.IntEnum):
    OPEN = 1
    AGGREGATING = 2
    DONE = 3
    FAILED = 4


@dataclass
class Round:
    job: str
    id: int
    layout: Layout
    expected: int
    quorum: int
    deadline_s: float = 0.0
    opened: float = field(default_factory=time.time)   # wall-clock seconds (reported)
    opened_mono: float = 0.0         # the engine clock's monotonic reading at opening (deadlines)
    state: State = State.OPEN
    accepted: dict[str, float] = field(default_factory=dict)   # client -> weight
    in_flight: set[str] = field(default_factory=set)
    detail: str = ""
    closed: float = 0.0
    last_arrival: float = 0.0        # monotonic time of the last accepted update
    post_arrival_s: float = 0.0
    total_weight: float = 0.0

    @staticmethod
    def check_params(expected: int, quorum: int, deadline_s: float) -> int:
        """Validate open parameters; return the effective quorum."""
        if expected < 1:
            raise LiflError("INVALID_ARGUMENT", f"expected clients must be >= 1, got {expected}")
        quorum = quorum or expected
        if not 1 <= quorum <= expected:
            raise LiflError("INVALID_ARGUMENT", f"quorum must be between 1 and expected ({expected}), got {quorum}")
        if deadline_s < 0 or not math.isfinite(deadline_s):
            raise LiflError("INVALID_ARGUMENT", f"deadline must be >= 0 seconds, got {deadline_s}")
        return quorum

    @property
    def deadline_unix(self) -> float:
        return self.opened + self.deadline_s if self.deadline_s else 0.0

    # -- admission -----------------------------------------------------------
    def begin(self, client: str) -> None:
        """An update's header was valid: may its bytes be received? A client whose update was
        accepted hears so (ALREADY_EXISTS) even once the round has closed: a resend after an
        acknowledgement that a crash cut (durable mode) learns that its update counts."""
        if not client:
            raise LiflError("INVALID_ARGUMENT", "client_id must not be empty")
        if len(client) > MAX_ID_CHARS:
            raise LiflError("INVALID_ARGUMENT", f"client_id {quote(client)} is longer than {MAX_ID_CHARS} characters")
        if client in self.accepted:
            raise LiflError("ALREADY_EXISTS",
                            f"round {self.id} already accepted an update from client {quote(client)}; it is counted once")
        if self.state != State.OPEN:
            raise LiflError("FAILED_PRECONDITION",
                            f"round {self.id} is {self.state.name.lower()} and takes no more updates"
                            + (f" ({self.detail})" if self.detail else ""))
        if client in self.in_flight:
            raise LiflError("ALREADY_EXISTS",
                            f"an update from client {quote(client)} for round {self.id} is still being received")
        if len(self.accepted) + len(self.in_flight) >= self.expected:
            raise LiflError("FAILED_PRECONDITION",
                            f"round {self.id} already has all {self.expected} expected updates (accepted or in flight)")
        self.in_flight.add(client)

    def abandon(self, client: str) -> None:
        """The stream failed; the client may try again."""
        self.in_flight.discard(client)

    def check_accept(self, weight: float) -> None:
        """May an update of this weight be recorded now? Raises without changing anything."""
        if self.state != State.OPEN:
            raise LiflError("FAILED_PRECONDITION", f"round {self.id} closed while the update was being received")
        check_weight(weight)
        if not math.isfinite(self.total_weight + weight):
            raise LiflError("INVALID_ARGUMENT", f"num_examples {weight} would make the round's total weight "
                                                f"overflow ({self.total_weight} so far); the update was refused")

    def accept(self, client: str, weight: float, now: float) -> None:
        self.in_flight.discard(client)
        self.check_accept(weight)
        self.accepted[client] = weight
        self.total_weight += weight
        self.last_arrival = now

    # -- closing ---------------------------------------------------------------
    def complete(self) -> bool:
        return len(self.accepted) >= self.expected

    def decide_close(self, now: float, forced: bool = False) -> State | None:
        """What the round should become at monotonic time ``now`` (None: stay open)."""
        if self.state != State.OPEN:
            return None
        if self.complete():
            return State.AGGREGATING
        if forced or (self.deadline_s and now >= self.opened_mono + self.deadline_s):
            return State.AGGREGATING if len(self.accepted) >= self.quorum else State.FAILED
        return None

    def close(self, to: State, detail: str, now_unix: float | None = None) -> None:
        self.state, self.detail = to, detail
        self.closed = time.time() if now_unix is None else now_unix
        if to == State.FAILED:
            self.in_flight.clear()

    def close_detail(self, forced: bool) -> str:
        n = len(self.accepted)
        if self.complete():
            return f"all {self.expected} expected updates arrived"
        why = "closed by an operator" if forced else "deadline passed"
        if n >= self.quorum:
            return f"{why} with {n} of {self.expected} updates (quorum {self.quorum})"
        return f"{why} with {n} of {self.expected} updates, below the quorum of {self.quorum}"
