"""The harness's one /proc sampler: memory and CPU of process trees over time (Linux, no psutil).

Every benchmark and the Flower harness measure the side they care about as a process
tree (a server, the functions it forks, a SuperLink and the ServerApps it starts), so
one thread here samples those trees and keeps both the peaks and a time series:

- every tick (cheap counters, no page-table walk): Σ RssAnon from /proc/<pid>/status and
  the bytes of /dev/shm segments named ``shm_prefix*``, for the peak of
  "private memory + shared memory counted once";
- every ``every``-th tick a full :class:`Sample`: Σ PSS and Σ RSS from
  /proc/<pid>/smaps_rollup, cumulative CPU-seconds, and with ``labels`` the same split by
  role. PSS charges each shared page 1/n to each of its n mappers, so a sum over a tree is
  its real footprint; RSS counts shared pages once per mapper.

smaps_rollup walks the page tables under the process's mmap_lock: read every 5 ms from a
10 GB process it slows that process down badly, hence the cheap counters every tick and
the expensive read only every ``every``-th one (``pss=False`` skips it for CPU-only use).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from lifl.procfs import children_map, cpu_seconds

Role = Callable[[int, int, Mapping[int, str]], str]


def kib_fields(path: str, *keys: bytes) -> list[int]:
    """The ``Key:  N kB`` fields of a /proc file, in bytes, in the order asked; zeros if the process is gone."""
    out = dict.fromkeys(keys, 0)
    left = len(out)
    try:
        with open(path, "rb") as f:
            for line in f:
                k = line.split(b":", 1)[0]
                if k in out:
                    out[k] = int(line.split()[1]) * 1024
                    left -= 1
                    if not left:
                        break
    except OSError:
        pass
    return list(out.values())


def pss_rss(pid: int) -> tuple[int, int]:
    """(PSS, RSS) from one read of /proc/<pid>/smaps_rollup (a page-table walk: the expensive read)."""
    pss, rss = kib_fields(f"/proc/{pid}/smaps_rollup", b"Pss", b"Rss")
    return pss, rss


def anon_rss(pid: int) -> int:
    """RssAnon from /proc/<pid>/status (a counter: no page-table walk)."""
    return kib_fields(f"/proc/{pid}/status", b"RssAnon")[0]


def shm_bytes(prefix: str, shm_dir: str = "/dev/shm") -> int:
    """Bytes allocated (not apparent size) by shared-memory files named ``prefix*``.

    Pages of a tmpfs file that no process maps are in nobody's PSS or RssAnon, so this
    is what keeps a memory figure from missing LIFL's shared memory.
    """
    total = 0
    try:
        with os.scandir(shm_dir) as it:
            for e in it:
                if e.name.startswith(prefix):
                    try:
                        total += e.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        pass
    except OSError:
        pass
    return total


def by_root(pid: int, root: int, labels: Mapping[int, str]) -> str:
    """The default role: a root's label, ``<label>-child`` for everything below it."""
    return labels[root] if pid == root else labels[root] + "-child"


@dataclass(frozen=True)
class Sample:
    """One full reading of the trees."""

    t: float                  # unix time
    cpu_s: float              # cumulative CPU-seconds of every process seen (exited ones keep their last reading)
    pss: int                  # Σ PSS bytes (0 with pss=False)
    rss: int                  # Σ RSS bytes (0 with pss=False)
    anon_shm: int             # Σ RssAnon + /dev/shm[shm_prefix] bytes
    shm: int                  # /dev/shm[shm_prefix] bytes (0 without shm_prefix)
    roles: dict[str, int] = field(default_factory=dict)        # role -> Σ PSS (with labels)
    role_cpu: dict[str, float] = field(default_factory=dict)   # role -> cumulative CPU-seconds (with labels)


class ProcSampler:
    """Samples process trees in a thread; read the peaks, the samples, or a window of them afterwards.

    ``roots``: a pid or several; their descendants are found again every ``rescan_s``
    (listing /proc costs more than a tick; 0 rescans every tick). ``labels`` (root pid ->
    name) turns on per-role attribution through ``role(pid, root, labels)``, asked again at
    every full sample (a child first seen between fork and exec changes role).
    ``start()`` (or ``with``) takes the first full sample before it returns: ``samples[0]`` is
    the baseline, never missing.
    """

    def __init__(self, roots: int | Sequence[int], interval: float = 0.005, *, every: int = 8, pss: bool = True,
                 rescan_s: float = 0.2, labels: Mapping[int, str] | None = None, role: Role = by_root,
                 shm_prefix: str | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.roots = [roots] if isinstance(roots, int) else list(roots)
        self.interval, self.every, self.pss, self.rescan_s = interval, every, pss, rescan_s
        self.labels, self.role, self.shm_prefix = dict(labels or {}), role, shm_prefix
        self.samples: list[Sample] = []
        self.ticks = 0
        self.peak_anon_shm = self.peak_shm = 0            # over every tick, not only the full samples
        self._tree: list[tuple[int, int]] = []            # (pid, its root)
        self._next_scan = 0.0
        self._cpu: dict[int, float] = {}                  # pid -> last CPU-seconds read
        self._role_of: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- sampling -----------------------------------------------------------------------------------
    def _rescan(self) -> None:
        kids = children_map()
        out, todo = [], [(r, r) for r in self.roots]
        while todo:
            p, root = todo.pop()
            out.append((p, root))
            todo.extend((k, root) for k in kids.get(p, ()))
        self._tree = out

    def _tick(self, full: bool) -> Sample | None:
        wall, mono = time.time(), time.monotonic()        # a sample is stamped when its reading starts
        if mono >= self._next_scan:
            self._rescan()
            self._next_scan = mono + self.rescan_s
        shm = shm_bytes(self.shm_prefix) if self.shm_prefix else 0
        anon_shm = sum(anon_rss(p) for p, _ in self._tree) + shm
        self.peak_anon_shm = max(self.peak_anon_shm, anon_shm)
        self.peak_shm = max(self.peak_shm, shm)
        self.ticks += 1
        if not full:
            return None
        pss = rss = 0
        roles: dict[str, int] = {}
        for pid, root in self._tree:
            c = cpu_seconds(pid)
            if c is not None:
                self._cpu[pid] = c
            a, b = pss_rss(pid) if self.pss else (0, 0)
            pss, rss = pss + a, rss + b
            if self.labels:
                r = self._role_of[pid] = self.role(pid, root, self.labels)
                roles[r] = roles.get(r, 0) + a
        role_cpu: dict[str, float] = {}
        if self.labels:
            for pid, c in self._cpu.items():
                r = self._role_of.get(pid, "?")
                role_cpu[r] = role_cpu.get(r, 0.0) + c
        s = Sample(wall, sum(self._cpu.values()), pss, rss, anon_shm, shm, roles, role_cpu)
        self.samples.append(s)
        return s

    def now(self) -> Sample:
        """A full sample taken now (also kept in ``samples``), e.g. CPU-seconds at a mark."""
        with self._lock:
            self._next_scan = 0.0              # a process started just before the mark is counted
            return self._tick(True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._tick(self.ticks % self.every == 0)

    def start(self) -> "ProcSampler":
        self.now()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "ProcSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- reading --------------------------------------------------------------------------------------
    @property
    def peak_pss(self) -> int:
        return max((s.pss for s in self.samples), default=0)

    @property
    def peak_rss(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    def window(self, t0: float, t1: float) -> dict:
        """CPU-seconds and peak PSS between unix times t0 and t1 (with labels: per role as well).

        CPU is the difference of the last sample at or before t0 and the first at or after t1,
        so a window between two sampling ticks still counts all of its CPU.
        """
        s = self.samples
        idx = [i for i, x in enumerate(s) if t0 <= x.t <= t1]
        before = [i for i, x in enumerate(s) if x.t <= t0]
        after = [i for i, x in enumerate(s) if x.t >= t1]
        i0 = before[-1] if before else idx[0]
        i1 = after[0] if after else idx[-1]
        ipeak = max(idx, key=lambda i: s[i].pss) if idx else None
        out = {"cpu_s": s[i1].cpu_s - s[i0].cpu_s, "peak_pss": s[ipeak].pss if idx else 0, "samples": len(idx)}
        if self.labels and idx:
            names = sorted({r for i in idx for r in s[i].roles})
            out["at_peak"] = {r: s[ipeak].roles.get(r, 0) for r in names}          # split of the total peak
            out["role_peak"] = {r: max(s[i].roles.get(r, 0) for i in idx) for r in names}
            out["role_cpu_s"] = {r: s[i1].role_cpu.get(r, 0.0) - s[i0].role_cpu.get(r, 0.0)
                                 for r in sorted(set(s[i1].role_cpu) | set(s[i0].role_cpu))}
        if self.shm_prefix and idx:
            out["shm_at_peak"] = s[ipeak].shm
            out["shm_peak"] = max(s[i].shm for i in idx)
        return out
