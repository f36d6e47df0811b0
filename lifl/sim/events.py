"""Virtual time for the discrete-event model: events run in time order (ties in the order they
were scheduled), and each node's cores are a first-come resource that work waits for."""
from __future__ import annotations

import heapq
import itertools
from typing import Callable


class EventLoop:
    def __init__(self, cores: dict[str, int]):
        self.now = 0.0
        self.cores = dict(cores)
        self._busy = {n: 0 for n in cores}
        self._waiting: dict[str, list] = {n: [] for n in cores}
        self._events: list = []
        self._seq = itertools.count()

    @property
    def pending(self) -> bool:
        return bool(self._events)

    def at(self, t: float, fn: Callable, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def on_core(self, node: str, seconds: float, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` once ``seconds`` of one of ``node``'s cores were spent on it (it waits
        for a free core first)."""
        if self._busy[node] < self.cores[node]:
            self._busy[node] += 1
            self.at(self.now + seconds, self._core_done, node, fn, args)
        else:
            self._waiting[node].append((seconds, fn, args))

    def _core_done(self, node: str, fn: Callable, args) -> None:
        self._busy[node] -= 1
        if self._waiting[node]:
            seconds, f2, a2 = self._waiting[node].pop(0)
            self.on_core(node, seconds, f2, *a2)
        fn(*args)

    def step(self) -> None:
        t, _, fn, args = heapq.heappop(self._events)
        self.now = max(self.now, t)
        fn(*args)

    def advance_to(self, t: float) -> None:
        while self._events and self._events[0][0] <= t:
            self.step()
        self.now = max(self.now, t)
