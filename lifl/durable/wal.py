"""A write-ahead log of JSON records, one per line, each framed with its CRC-32.

A line is ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``. An append is durable once
:meth:`Wal.append` returns (the file is fsynced). Reading tolerates exactly one kind of damage,
the one a kill leaves: a torn *last* record (no newline, or a bad CRC on the last line) is
dropped and the file truncated before it. A bad record followed by good ones is corruption a
kill cannot cause: :class:`WalCorrupt`, and the server refuses to start rather than guess.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

log = logging.getLogger("lifl.durable")


class WalCorrupt(ValueError):
    """A record other than the last is damaged (a ValueError: ``lifl serve`` says so in one line
    and exits 1, no traceback)."""


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def frame(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _parse(line: bytes) -> dict | None:
    """A record, or None when the line is damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        rec = json.loads(body)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read(path: Path) -> tuple[list[dict], int]:
    """Every intact record and the byte length they span; a torn last record is left out.
    Raises :class:`WalCorrupt` for damage anywhere else."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records, good, pos = [], 0, 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last:          # bytes after the final newline: a record whose write was cut
            if line:
                log.warning("%s: dropping a torn last record (%d bytes without a newline)", path, len(line))
            break
        rec = _parse(line)
        if rec is None:
            if all(not rest for rest in lines[i + 1:]):
                log.warning("%s: dropping a damaged last record at byte %d", path, pos)
                break
            raise WalCorrupt(f"{path}: record {i + 1} (byte {pos}) is damaged and records follow it; "
                             "this is not a torn write from a crash. Refusing to start: restore the "
                             "directory from a backup or move it away (its rounds are then lost)")
        records.append(rec)
        pos += len(line) + 1
        good = pos
    return records, good


class Wal:
    """The log, open for appending; each append is fsynced before it returns."""

    def __init__(self, path: Path):
        """Open for appending. Recovery rewrites the log first (:func:`rewrite`), so a torn tail
        is never appended after."""
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fsync_dir(path.parent)

    def append(self, record: dict) -> None:
        """Append and fsync; on a write error the log is cut back to where it was (a failed
        append must not leave a damaged record that later ones would follow)."""
        data = frame(record)
        view = memoryview(data)
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, end)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def rewrite(path: Path, records: list[dict]) -> None:
    """Replace the log by ``records`` atomically (write, fsync, rename, fsync the directory)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for rec in records:
            f.write(frame(rec))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
