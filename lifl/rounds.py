"""Round lifecycle: open -> aggregating -> done | failed, as a pure state machine.

It decides, it does not act: the dispatcher asks it whether an update may start,
records what was accepted, and learns when to close. Close rules:

* all expected updates accepted -> close and aggregate them;
* deadline passed with at least ``quorum`` accepted -> close, aggregate those,
  cancel streams still in flight;
* deadline passed below quorum -> fail (updates discarded);
* an explicit close (admin) -> like a deadline; an abort -> fail.
Updates for an unknown, closed or failed round are refused.

Client behaviours (docs/clients.md): a client's update is taken once. A repeat from a client whose
update was accepted is a :class:`Duplicate` carrying the accepted update's :class:`Digest`, so the
gateway can answer an identical retry as success and refuse different content (ALREADY_EXISTS); a
second stream while the first is still being received is ABORTED (exactly one stream wins); once
the deadline has passed (even before the control loop closes the round) an update is
DEADLINE_EXCEEDED and nothing is stored.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from .content_hash import ContentHash
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


@dataclass
class Digest:
    """What makes two pushes of one client "the same update": a 64-bit content hash of its bytes
    (``content_hash``: computed while the gateway copies them into the slot) plus its size,
    weight and encoding. Not a cryptographic hash: a different update that collides is answered
    as a duplicate of the one already accepted — and, like any duplicate, never folded. ``hash``
    -1: unknown (a record from before this hash), equal to nothing."""
    weight: float
    encoding: int
    size: int = 0
    hash: int = 0

    def __post_init__(self) -> None:
        self._stream = ContentHash()   # not a field: never sent or journalled

    def update(self, data, slot=None, checks=None) -> tuple[int, int]:
        """Take ``data`` (the update's next bytes) into the hash, copying it into ``slot`` at its
        place and checking it (``content_hash.ingest``) in the same pass when given."""
        found = self._stream.take(data, slot, self.size, checks)
        self.size += len(data)
        self.hash = self._stream.value()
        return found

    def to_dict(self) -> dict:
        """The digest as sent and journalled (``from_dict`` reads it back); per push, so no ``asdict``."""
        return {"weight": self.weight, "encoding": self.encoding, "size": self.size, "hash": self.hash}

    @classmethod
    def from_dict(cls, d: dict) -> "Digest":
        """A digest as sent or journalled; one journalled before the content hash (a CRC-32 under
        ``crc``) cannot be compared: its hash is unknown."""
        if "crc" in d:
            return cls(d["weight"], d["encoding"], d["size"], -1)
        return cls(**d)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Digest) or self.hash < 0 or other.hash < 0:
            return False
        return (self.weight, self.encoding, self.size, self.hash) == (other.weight, other.encoding, other.size,
                                                                      other.hash)


class Duplicate(LiflError):
    """A push from a client whose update this round already accepted: ALREADY_EXISTS, unless the
    gateway finds the content identical to ``prior`` (then the push succeeds as a duplicate)."""

    def __init__(self, message: str, prior: "Digest | None", accepted: int = 0):
        super().__init__("ALREADY_EXISTS", message)
        self.prior, self.accepted = prior, accepted   # accepted: the round's count


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
    digests: dict[str, Digest] = field(default_factory=dict)   # client -> its accepted update's digest
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
    def past_deadline(self, now: float) -> bool:
        """Has the deadline passed at monotonic time ``now`` (whether or not the round closed yet)?"""
        return bool(self.deadline_s) and now >= self.opened_mono + self.deadline_s

    def _refuse_closed(self, what: str) -> LiflError:
        code = "DEADLINE_EXCEEDED" if self.detail.startswith("deadline passed") else "FAILED_PRECONDITION"
        return LiflError(code, f"round {self.id} is {self.state.name.lower()} and {what}"
                               + (f" ({self.detail})" if self.detail else ""))

    def _refuse_late(self, now: float) -> LiflError:
        return LiflError("DEADLINE_EXCEEDED", f"round {self.id}'s deadline passed {now - self.opened_mono - self.deadline_s:.3g} s "
                                              f"ago (deadline {self.deadline_s:g} s); the update was not stored")

    def begin(self, client: str, now: float | None = None) -> None:
        """An update's header was valid: may its bytes be received? ``now``: the engine's
        monotonic time (None: the deadline is left to the control loop). A client whose update
        was accepted hears so even once the round has closed: a resend after an acknowledgement
        that a crash cut (durable mode) learns that its update counts."""
        if not client:
            raise LiflError("INVALID_ARGUMENT", "client_id must not be empty")
        if len(client) > MAX_ID_CHARS:
            raise LiflError("INVALID_ARGUMENT", f"client_id {quote(client)} is longer than {MAX_ID_CHARS} characters")
        if client in self.accepted and self.state != State.FAILED:
            raise Duplicate(f"round {self.id} already accepted an update from client {quote(client)}; it is "
                            "counted once (a retry of identical content succeeds, different content is refused)",
                            self.digests.get(client), len(self.accepted))
        if self.state != State.OPEN:
            raise self._refuse_closed("takes no more updates")
        if now is not None and self.past_deadline(now):
            raise self._refuse_late(now)
        if client in self.in_flight:
            raise LiflError("ABORTED",
                            f"an update from client {quote(client)} for round {self.id} is still being received "
                            "on another stream; one stream per client is taken: push again if that one fails")
        if len(self.accepted) + len(self.in_flight) >= self.expected:
            raise LiflError("FAILED_PRECONDITION",
                            f"round {self.id} already has all {self.expected} expected updates (accepted or in flight)")
        self.in_flight.add(client)

    def abandon(self, client: str) -> None:
        """The stream failed; the client may try again."""
        self.in_flight.discard(client)

    def check_accept(self, weight: float, now: float | None = None) -> None:
        """May an update of this weight be recorded now (monotonic ``now``)? Raises without
        changing anything."""
        if self.state != State.OPEN:
            raise self._refuse_closed("closed while the update was being received")
        if now is not None and self.past_deadline(now):
            raise self._refuse_late(now)
        check_weight(weight)
        if not math.isfinite(self.total_weight + weight):
            raise LiflError("INVALID_ARGUMENT", f"num_examples {weight} would make the round's total weight "
                                                f"overflow ({self.total_weight} so far); the update was refused")

    def accept(self, client: str, weight: float, now: float, digest: Digest | None = None) -> None:
        self.in_flight.discard(client)
        self.check_accept(weight, now)
        self.accepted[client] = weight
        if digest is not None:
            self.digests[client] = digest
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
