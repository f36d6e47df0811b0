"""Recovery: replay the write-ahead log into a fresh engine.

:func:`replay` is pure: records in, one :class:`RoundLog` per round out. :func:`resume` then
drives the engine through its ordinary entry points: a finished round gets its result back
from its file; a round that was open or aggregating is opened again with the same id, opening
time and settings, every logged update is copied from its file into a slot and accepted again
(the normal eager fold), and a round that was closed is closed again — so it ends with exactly
the FedAvg of exactly the updates that were acknowledged. Before the engine starts, the log is
compacted (rounds that were forgotten, failed rounds' updates and a torn tail go) and data
files no record names are deleted.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import Layout
from ..rounds import Digest, Round, State
from . import wal
from .journal import WAL_NAME, Journal

log = logging.getLogger("lifl.durable")


@dataclass
class RoundLog:
    """What the log says about one round."""

    open: dict
    accepts: list[dict] = field(default_factory=list)
    close: dict | None = None
    fail: dict | None = None
    done: dict | None = None
    forgotten: bool = False

    def records(self) -> list[dict]:
        """The round's records after compaction."""
        if self.forgotten:
            return []
        if self.fail is not None:
            return [dict(self.open, initial=None), self.fail]
        out = [self.open] if self.done is None else [dict(self.open, initial=None)]
        if self.done is None:
            out += self.accepts
        out += [r for r in (self.close, self.done) if r is not None]
        return out

    def files(self) -> list[str]:
        """Data files the compacted records name."""
        names = [r.get("initial") or r.get("file") or r.get("result") for r in self.records()]
        return [n for n in names if n]


def replay(records: list[dict]) -> dict[int, RoundLog]:
    """Fold records into rounds (pure). Records of a round never opened are a bug: refused."""
    rounds: dict[int, RoundLog] = {}
    for rec in records:
        t, rid = rec.get("t"), rec.get("rid")
        if t == "open":
            rounds[rid] = RoundLog(rec)
            continue
        rl = rounds.get(rid)
        if rl is None:
            raise wal.WalCorrupt(f"a {t!r} record for round {rid}, which the log never opened")
        if t == "accept":
            rl.accepts.append(rec)
        elif t in ("close", "fail", "done"):
            setattr(rl, t, rec)
        elif t == "forget":
            rl.forgotten = True
        else:
            raise wal.WalCorrupt(f"unknown record type {t!r} for round {rid}")
    return rounds


def open_journal(root: Path) -> tuple[Journal, dict[int, RoundLog]]:
    """Read and compact the log in ``root`` and open it for appending."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    lock = take_lock(root)
    records, _ = wal.read(root / WAL_NAME)
    rounds = replay(records)
    live = {rid: rl for rid, rl in rounds.items() if not rl.forgotten}
    wal.rewrite(root / WAL_NAME, [r for rl in live.values() for r in rl.records()])
    keep = {n for rl in live.values() for n in rl.files()}
    for p in (root / "data").iterdir():
        if p.name not in keep:   # a push cut before its record, a failed round's updates
            p.unlink()
    journal = Journal(root)
    journal.lock_fd = lock
    return journal, live


def take_lock(root: Path, wait_s: float = 10.0) -> int:
    """One server per directory: an exclusive ``flock`` on ``root/lock``, which the kernel drops
    when its holder dies (a SIGKILLed server's functions may hold it a moment longer: wait)."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise OSError(errno.EBUSY, f"durable_dir {root} is in use by another running server") from None
            time.sleep(0.05)


def _read_into(seg, path: Path, size: int) -> None:
    with open(path, "rb") as f:
        if f.readinto(seg.buf[:size]) != size:
            raise wal.WalCorrupt(f"{path} is shorter than the {size} bytes its record promises")


def resume(dispatcher, journal: Journal, rounds: dict[int, RoundLog]) -> int:
    """Bring every logged round back into ``dispatcher``; returns how many updates were re-accepted."""
    from ..engine.store import RoundRun
    arena, data = dispatcher.arena, journal.data
    results: dict[int, object] = {}
    n = 0
    journal.replaying = True
    try:
        for rid in sorted(rounds):
            rl = rounds[rid]
            o = rl.open
            layout = Layout.from_wire(o["layout"])
            if rl.done is not None or rl.fail is not None:
                end = rl.done or rl.fail
                rnd = Round(o["job"], rid, layout, o["expected"], o["quorum"], o["deadline_s"], opened=o["opened"],
                            state=State.DONE if rl.done else State.FAILED, detail=end["detail"],
                            closed=end["closed"])
                for client, weight in (rl.done or {}).get("accepted", {}).items():
                    rnd.accepted[client] = weight
                    rnd.total_weight += weight
                rnd.digests = {c: Digest.from_dict(d) for c, d in (rl.done or {}).get("digests", {}).items()}
                run = RoundRun(rnd, released=True)
                if rl.done:
                    rnd.post_arrival_s = rl.done["post_arrival_s"]
                    run.result = arena.segment(layout.total_size)
                    _read_into(run.result, data / rl.done["result"], layout.total_size)
                    results[rid] = run.result
                    journal.track(rid, rl.done["result"])
                run.finish()
                dispatcher.restore(run)
                continue
            initial = None
            if o.get("initial"):
                initial = arena.segment(layout.total_size)
                _read_into(initial, data / o["initial"], layout.total_size)
            elif o.get("from_round") and o["from_round"] in results:
                initial = arena.share(results[o["from_round"]].name)
            dispatcher.open_round(o["job"], layout, o["expected"], o["quorum"], o["deadline_s"], initial,
                                  from_round=o.get("from_round", 0), resume=(rid, o["opened"]))
            journal.track(rid, o.get("initial"))
            run = dispatcher.get(o["job"], rid)
            for a in rl.accepts:
                path = data / a["file"]
                size = path.stat().st_size
                slot = arena.acquire_slot(size, timeout=dispatcher.config.admission_timeout_s)
                try:
                    _read_into(slot, path, size)
                except BaseException:
                    arena.release_slot(slot.name)
                    raise
                dispatcher.accept(run, a["client"], slot.name, a["weight"], durable=a["file"],
                                  digest=Digest.from_dict(a["digest"]) if a.get("digest") else None)
                n += 1
            # the deadline kept running while the server was down: it counts from the opening again
            # only now, so that no replayed accept could close the round half replayed
            clock = dispatcher.clock
            run.round.opened_mono = clock.monotonic() - max(0.0, clock.time() - o["opened"])
            if rl.close is not None and run.round.state == State.OPEN:
                dispatcher.close_round(o["job"], rid, abort=False)
                run.round.detail = rl.close["detail"]
            log.info("round %d of job %s resumed from %s: %d update(s) re-accepted, %s", rid, o["job"],
                     journal.root, len(rl.accepts), run.round.state.name.lower())
    finally:
        journal.replaying = False
    return n
