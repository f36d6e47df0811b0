"""CPU-seconds and proportional memory (PSS) of process trees, sampled from /proc (Linux)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..procfs import cpu_seconds, pss_bytes, process_tree

@dataclass
class TreeSample:
    t: float
    pss_bytes: int
    processes: int
    root_cpu_s: float
    children_cpu_s: float


@dataclass
class TreeSampler:
    """Samples a process tree every ``period_s`` on a thread (``with TreeSampler(pid) as s: ...``).

    The root's CPU is the gateway's (server process); descendants are the
    aggregator functions and their fork server, including reaped children.
    """

    root: int
    period_s: float = 0.1
    samples: list[TreeSample] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lifl-sim-sampler", daemon=True)
        self._t0 = time.monotonic()

    def sample(self) -> TreeSample:
        pids = process_tree([self.root])
        kids = [p for p in pids if p != self.root]
        s = TreeSample(time.monotonic() - self._t0, sum(pss_bytes(p) for p in pids), len(pids),
                       cpu_seconds(self.root) or 0.0, sum(cpu_seconds(p, children=True) or 0.0 for p in kids))
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def __enter__(self) -> "TreeSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_pss(self) -> int:
        return max((s.pss_bytes for s in self.samples), default=0)

    def cpu_since_start(self) -> tuple[float, float]:
        """(root, descendants) CPU-seconds between the first and the last sample (descendants: peak,
        since a stopped function's seconds leave the tree with it unless its parent reaped it)."""
        if not self.samples:
            return 0.0, 0.0
        a = self.samples[0]
        kids = max(s.children_cpu_s for s in self.samples)
        return self.samples[-1].root_cpu_s - a.root_cpu_s, max(0.0, kids - a.children_cpu_s)
