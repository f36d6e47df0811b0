"""Durable mode's journal: what the engine calls at each step that must survive a SIGKILL.

Files under ``durable_dir``: ``wal.jsonl`` (``lifl.durable.wal``), ``data/`` (the bytes of every
accepted update and initial model still needed, and every kept result). Order is what makes it
sound: a file's bytes are written and fsynced (and its directory entry) *before* the record that
names it is appended and fsynced, and that append happens before the engine acts on it — so an
update is acknowledged only once a restart is sure to find it. A file no record names is the
remnant of a push that was cut; recovery deletes it.

The engine sees this as a hook with no-op default (:data:`NO_JOURNAL`); all methods except
:meth:`stage` run under the engine's lock, in the engine's order, which is the log's order.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path

from ..errors import LiflError
from .wal import Wal, fsync_dir

log = logging.getLogger("lifl.durable")

WAL_NAME = "wal.jsonl"


def write_file(path: Path, buf) -> None:
    """Write ``buf`` to a new file and fsync it (not yet its directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(buf).cast("B")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class NoJournal:
    """The default (non-durable) mode: nothing is persisted."""

    on = False
    replaying = False

    def stage(self, buf) -> str | None:
        return None

    def discard(self, name: str | None) -> None: ...
    def opened(self, rnd, initial: str | None, from_round: int) -> None: ...
    def accepted(self, rid: int, client: str, weight: float, name: str | None, digest=None) -> None: ...
    def closed(self, rnd) -> None: ...
    def failed(self, rnd) -> None: ...
    def finalized(self, run) -> None: ...
    def forgotten(self, rid: int) -> None: ...
    def close(self) -> None: ...


NO_JOURNAL = NoJournal()


class Journal(NoJournal):
    """Durable mode: a WAL plus data files in one directory."""

    on = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.wal = Wal(self.root / WAL_NAME)
        self.replaying = False         # recovery re-drives the engine: nothing is re-logged
        self._files: dict[int, list[str]] = {}   # round -> data files to delete once it is finished
        self._lock = threading.Lock()
        self.lock_fd = -1              # recover.take_lock: one server per directory

    # -- data files ---------------------------------------------------------------------------
    def stage(self, buf) -> str:
        """Persist bytes (an update's slot, an initial model) and return the file's name. Called
        outside the engine's lock: this is the slow part (a copy and an fsync)."""
        name = f"{uuid.uuid4().hex}.bin"
        try:
            write_file(self.data / name, buf)
            fsync_dir(self.data)
        except OSError as e:
            self._unlink(name)
            log.error("durable mode: cannot persist %d bytes in %s: %s", len(memoryview(buf)), self.data, e)
            raise LiflError("UNAVAILABLE", f"the server cannot persist updates in its durable_dir ({e.strerror}); "
                                           "nothing was recorded: push again later") from None
        return name

    def discard(self, name: str | None) -> None:
        """A staged file no record will name (the push was refused after all)."""
        if name:
            self._unlink(name)

    def _unlink(self, name: str) -> None:
        try:
            (self.data / name).unlink()
        except FileNotFoundError:
            pass

    def track(self, rid: int, name: str | None) -> None:
        if name:
            self._files.setdefault(rid, []).append(name)

    def _drop_files(self, rid: int) -> None:
        for name in self._files.pop(rid, []):
            self._unlink(name)

    # -- records (under the engine's lock) ---------------------------------------------------------
    def _append(self, rec: dict) -> None:
        if not self.replaying:
            with self._lock:
                try:
                    self.wal.append(rec)
                except OSError as e:
                    log.error("durable mode: cannot append to %s: %s", self.wal.path, e)
                    raise LiflError("UNAVAILABLE", f"the server cannot write its log in its durable_dir "
                                                   f"({e.strerror}); nothing was recorded") from None

    def opened(self, rnd, initial: str | None, from_round: int) -> None:
        self.track(rnd.id, initial)
        self._append({"t": "open", "rid": rnd.id, "job": rnd.job, "layout": rnd.layout.to_wire(),
                      "expected": rnd.expected, "quorum": rnd.quorum, "deadline_s": rnd.deadline_s,
                      "opened": rnd.opened, "initial": initial, "from_round": from_round})

    def accepted(self, rid: int, client: str, weight: float, name: str | None, digest=None) -> None:
        """``digest`` (``rounds.Digest``) is kept so that an identical retry after a restart is
        still answered as a duplicate success, not ALREADY_EXISTS."""
        self.track(rid, name)
        self._append({"t": "accept", "rid": rid, "client": client, "weight": weight, "file": name,
                      "digest": digest.to_dict() if digest is not None else None})

    def closed(self, rnd) -> None:
        self._append({"t": "close", "rid": rnd.id, "detail": rnd.detail, "closed": rnd.closed})

    def failed(self, rnd) -> None:
        self._append({"t": "fail", "rid": rnd.id, "detail": rnd.detail, "closed": rnd.closed})
        self._drop_files(rnd.id)

    def finalized(self, run) -> None:
        """The result is written and fsynced, then recorded; only then are the round's update
        files let go (until that record, a restart re-folds them)."""
        rnd = run.round
        name = f"result-{rnd.id}.bin"
        self._unlink(name)   # a result whose record never made it (killed in between)
        write_file(self.data / name, run.result.buf[:rnd.layout.total_size])
        fsync_dir(self.data)
        self._append({"t": "done", "rid": rnd.id, "result": name, "post_arrival_s": rnd.post_arrival_s,
                      "closed": rnd.closed, "detail": rnd.detail, "accepted": rnd.accepted,
                      "digests": {c: d.to_dict() for c, d in rnd.digests.items()}})
        self._drop_files(rnd.id)
        self._files[rnd.id] = [name]

    def forgotten(self, rid: int) -> None:
        """A finished round left the table (``keep_rounds``): its result file goes too."""
        self._append({"t": "forget", "rid": rid})
        self._drop_files(rid)

    def close(self) -> None:
        self.wal.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)   # releases the directory's lock
            self.lock_fd = -1
