"""Shared-memory arena: named POSIX segments with owner-only permissions.

Every segment is created by the server process (the gateway's owner); worker
processes only attach. Names are ``{prefix}-{pid}-{serial}`` so a restarted
server can find and unlink what a crashed one (a dead pid) left behind, and a
SIGKILLed worker can leak nothing because it owns nothing.

Update slots come from a budgeted pool: a slot is taken when an update's header
is accepted and returned after its leaf has folded it, so memory held by
in-flight updates never exceeds the budget (that is the gateway's backpressure).
Free slots are kept for reuse (pages stay mapped and faulted in); they are
evicted only when a slot of another size needs room.
"""
from __future__ import annotations

import collections
import errno
import itertools
import mmap
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LiflError

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")  # nosec B108  # segments are created O_EXCL (an existing file is an error), mode 0600


_SERIALS = itertools.count(1)  # per process, not per arena: two servers in one process never collide

try:
    from . import _foldc
except ImportError:  # pragma: no cover - built at install time when a C compiler exists
    _foldc = None

# madvise(MADV_POPULATE_WRITE), Linux 5.14+: map every page of a range writable in one call
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class BudgetExhausted(RuntimeError):
    """No slot could be had within the wait allowed."""


class ShmFull(LiflError):
    """The shared-memory filesystem cannot hold a segment (a request LIFL refuses, not a crash)."""

    def __init__(self, message: str):
        super().__init__("RESOURCE_EXHAUSTED", message)


def free_bytes(shm_dir: Path = SHM_DIR) -> int:
    """Bytes the shared-memory filesystem can still hand out (to an unprivileged writer)."""
    st = os.statvfs(shm_dir)
    return st.f_bavail * st.f_frsize


class Segment:
    """One mapped shared-memory segment. Use as a context manager or call close().

    A new segment's pages are reserved at creation (``posix_fallocate``): on a tmpfs that
    is too small the creation fails with :class:`ShmFull` and leaves no file, where a
    sparse file would map fine and later kill whoever touches a missing page with SIGBUS.
    """

    def __init__(self, name: str, size: int, create: bool, shm_dir: Path = SHM_DIR):
        self.name, self.size, self.path = name, size, shm_dir / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, max(size, 1))
            else:
                size = os.fstat(fd).st_size
                self.size = size
            self._mmap = mmap.mmap(fd, max(size, 1))
        except (OSError, OverflowError, ValueError) as e:
            if create:
                self.unlink()
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ShmFull(f"shared memory ({shm_dir}) cannot hold a segment of {size} bytes: "
                              f"{os.strerror(e.errno)}; {free_bytes(shm_dir)} bytes are free") from None
            raise
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)[:size]
        self._prefaulted = False

    @classmethod
    def attach(cls, name: str, shm_dir: Path = SHM_DIR, prefault: bool = False) -> "Segment":
        """Map an existing segment; ``prefault``: for a process about to touch all of it."""
        seg = cls(name, 0, create=False, shm_dir=shm_dir)
        if prefault:
            seg.prefault()
        return seg

    def prefault(self) -> bool:
        """Map all of this segment's pages into this process now, in one system call.

        Why: a fresh mapping of a tmpfs file faults one page at a time on first touch (a 4 MiB
        update: ~1,000 faults, ~1.5 ms on the 2-core machine); populating it in one call costs
        about a third less, and a mapping that is reused (cached slots) pays it once. The C
        kernel makes the call without the GIL (``mmap.madvise`` holds it while the kernel zeroes
        the pages, and a gateway process's other streams would wait). Returns False where the
        kernel cannot (before Linux 5.14): pages then fault in as touched."""
        if self._prefaulted or self._mmap is None:
            return self._prefaulted
        try:
            if _foldc is not None:
                if _foldc.populate(self._mmap):
                    return False
            else:
                self._mmap.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError, BufferError):
            return False
        self._prefaulted = True
        return True

    def array(self, dtype=np.uint8, count: int = -1, offset: int = 0) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        if self._mmap is None:
            return
        self.buf.release()
        try:
            self._mmap.close()
        except BufferError:  # a numpy view still alive: leave the mapping to GC
            pass
        self._mmap = None

    def unlink(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink segments ``{prefix}-{pid}-*`` whose creating process is dead; return their names."""
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+$")
    gone = []
    for p in shm_dir.iterdir():
        m = pat.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            try:
                p.unlink()
                gone.append(p.name)
            except FileNotFoundError:
                pass
    return gone


def list_segments(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    return sorted(p.name for p in shm_dir.iterdir() if p.name.startswith(prefix + "-"))


@dataclass
class ArenaStats:
    budget_bytes: int
    slots_in_use: int
    slot_bytes_in_use: int
    slot_bytes_cached: int
    other_bytes: int
    segments: int = field(default=0)


class Arena:
    """Owns every segment of one server; close() unlinks them all."""

    def __init__(self, budget_bytes: int, prefix: str = "lifl", shm_dir: Path = SHM_DIR):
        self.budget = int(budget_bytes)
        self.prefix, self.shm_dir = prefix, shm_dir
        self._cond = threading.Condition()
        self._free: dict[int, list[Segment]] = {}   # size -> cached free update slots
        self._in_use: dict[str, Segment] = {}        # update slots handed out
        self._scratch_free: dict[int, list[Segment]] = {}
        self._others: dict[str, Segment] = {}        # accumulators, results, initial models
        self._refs: dict[str, int] = {}              # extra holders of an _others segment (share())
        # unlinked since drain_unlinked(): functions may still map them (bounded: an arena nobody drains)
        self._unlinked: collections.deque[str] = collections.deque(maxlen=4096)
        self._closed = False
        self.reclaimed = reclaim_stale(prefix, shm_dir)

    # -- naming / creation ---------------------------------------------------
    def ensure_room(self, size: int, what: str) -> None:
        """Refuse (:class:`ShmFull`) before creating anything when the filesystem cannot hold ``size`` bytes."""
        free = free_bytes(self.shm_dir)
        if size > free:
            raise ShmFull(f"{what} needs {size} bytes of shared memory but {self.shm_dir} has {free} free; "
                          "enlarge it (a container's /dev/shm is often 64 MiB) or use a smaller model")

    def _new(self, size: int) -> Segment:
        return Segment(f"{self.prefix}-{os.getpid()}-{next(_SERIALS)}", size, create=True, shm_dir=self.shm_dir)

    # -- budgeted update slots ---------------------------------------------
    def _cached_bytes(self) -> int:
        return sum(s.size for segs in self._free.values() for s in segs)

    def _used_bytes(self) -> int:
        return sum(s.size for s in self._in_use.values())

    def acquire_slot(self, size: int, timeout: float = 0.0) -> Segment:
        """A slot of exactly ``size`` bytes; waits up to ``timeout`` s for budget, else BudgetExhausted."""
        if size > self.budget:
            raise BudgetExhausted(f"an update of {size} bytes is larger than the whole slot budget ({self.budget} bytes)")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise BudgetExhausted("the arena is closed")
                if self._free.get(size):
                    seg = self._free[size].pop()
                    self._in_use[seg.name] = seg
                    return seg
                used = self._used_bytes()
                if used + size <= self.budget:
                    self._evict_for(size)
                    seg = self._new(size)
                    self._in_use[seg.name] = seg
                    return seg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetExhausted(
                        f"slot budget full: {len(self._in_use)} updates ({used} bytes) are waiting to be folded, "
                        f"budget is {self.budget} bytes")
                self._cond.wait(left)

    def _evict_for(self, size: int) -> None:
        """Unlink cached free slots (largest first) so in-use + cached + size fits the budget."""
        excess = self._used_bytes() + self._cached_bytes() + size - self.budget
        for sz in sorted(self._free, reverse=True):
            segs = self._free[sz]
            while segs and excess > 0:
                seg = segs.pop()
                excess -= seg.size
                self._drop(seg)

    def release_slot(self, name: str) -> None:
        with self._cond:
            seg = self._in_use.pop(name, None)
            if seg is None:
                return
            if self._closed:
                seg.close()
                seg.unlink()
            else:
                self._free.setdefault(seg.size, []).append(seg)
            self._cond.notify_all()

    # -- unbudgeted segments: accumulators, results -------------------------
    def scratch(self, size: int) -> Segment:
        """A reusable segment (accumulators, results); give it back with release_scratch.

        A new one holds zeros: its pages were allocated at creation (``posix_fallocate``), so
        no fold or finalize allocates them on its critical path. This process does not touch
        them: the functions that do map them in one call (``Segment.attach(prefault=True)``).
        A reused one holds whatever it held."""
        with self._cond:
            if self._scratch_free.get(size):
                seg = self._scratch_free[size].pop()
                self._others[seg.name] = seg
                return seg
            seg = self._new(size)
            self._others[seg.name] = seg
            return seg

    def result_segment(self, size: int) -> Segment:
        """A segment for a round's result (an update's size): a cached free update slot when
        there is one — when a round finalises its updates are all folded, so its slots sit
        idle — else a new one. Give it back with :meth:`recycle_as_slot`."""
        with self._cond:
            if self._free.get(size):
                seg = self._free[size].pop()
                self._others[seg.name] = seg
                return seg
        return self.scratch(size)

    def recycle_as_slot(self, name: str) -> None:
        """Let go of a result segment: it becomes a cached free update slot if the budget has
        room for one more, else it is unlinked."""
        with self._cond:
            if not self._last_holder(name):
                return
            seg = self._others.pop(name, None)
            if seg is None:
                return
            if not self._closed and self._used_bytes() + self._cached_bytes() + seg.size <= self.budget:
                self._free.setdefault(seg.size, []).append(seg)
                self._cond.notify_all()
                return
            self._drop(seg)

    def share(self, name: str) -> Segment:
        """One more holder of a held segment (a round opened from another's result reads the
        same bytes); each holder gives it back with release_scratch or free, the last one counts."""
        with self._cond:
            seg = self._others.get(name)
            if seg is None:
                raise KeyError(f"segment {name} is not held by this arena")
            self._refs[name] = self._refs.get(name, 0) + 1
            return seg

    def _last_holder(self, name: str) -> bool:
        """Count one holder out; True if it was the last (call with the lock held)."""
        extra = self._refs.pop(name, 0)
        if extra > 1:
            self._refs[name] = extra - 1
        return extra == 0

    def release_scratch(self, name: str) -> None:
        with self._cond:
            if not self._last_holder(name):
                return
            seg = self._others.pop(name, None)
            if seg is not None:
                self._scratch_free.setdefault(seg.size, []).append(seg)

    def segment(self, size: int) -> Segment:
        """A segment owned until free() (results, initial models)."""
        with self._cond:
            seg = self._new(size)
            self._others[seg.name] = seg
            return seg

    def get(self, name: str) -> Segment:
        """A segment this arena handed out and still holds (KeyError otherwise)."""
        with self._cond:
            seg = self._in_use.get(name) or self._others.get(name)
        if seg is None:
            raise KeyError(f"segment {name} is not held by this arena")
        return seg

    def free(self, name: str) -> None:
        with self._cond:
            if not self._last_holder(name):
                return
            seg = self._others.pop(name, None)
            if seg is not None:
                self._drop(seg)

    def _drop(self, seg: Segment) -> None:
        """Unmap and unlink a segment this arena no longer holds (call with the lock held)."""
        seg.close()
        seg.unlink()
        self._unlinked.append(seg.name)

    def trim(self) -> int:
        """Unlink every cached free segment (update slots, accumulators, journals): all an idle
        server holds beyond the results it keeps. Returns the bytes let go."""
        with self._cond:
            segs = self._take_cached()
            for seg in segs:
                self._drop(seg)
            return sum(s.size for s in segs)

    def _take_cached(self) -> list[Segment]:
        """Remove and return every cached free segment (call with the lock held)."""
        segs = [s for group in (self._free, self._scratch_free) for ss in group.values() for s in ss]
        self._free.clear()
        self._scratch_free.clear()
        return segs

    def drain_unlinked(self) -> list[str]:
        """Names unlinked since the last call. A function that still maps one keeps its pages
        alive, so the server tells its functions to forget them."""
        with self._cond:
            names = list(self._unlinked)
            self._unlinked.clear()
            return names

    def stats(self) -> ArenaStats:
        with self._cond:
            return ArenaStats(
                budget_bytes=self.budget,
                slots_in_use=len(self._in_use),
                slot_bytes_in_use=self._used_bytes(),
                slot_bytes_cached=self._cached_bytes(),
                other_bytes=sum(s.size for s in self._others.values())
                + sum(s.size for segs in self._scratch_free.values() for s in segs),
                segments=len(self._in_use) + len(self._others) + sum(map(len, self._free.values()))
                + sum(map(len, self._scratch_free.values())),
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            segs = list(self._in_use.values()) + list(self._others.values()) + self._take_cached()
            self._in_use.clear(); self._others.clear()
            self._refs.clear()
            self._cond.notify_all()
        for seg in segs:
            seg.close()
            seg.unlink()

    def __enter__(self) -> "Arena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
