"""The gateways in virtual time: each node's gateway ingests its clients' updates one at a time
(the measured push cost), each into a shared-memory slot of a fixed budget that a fold gives back;
a client waits when no slot is free (backpressure), as on the real server."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .events import EventLoop


@dataclass
class _Gateway:
    ready: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pos: int = 0
    busy: bool = False
    wake_at: float = -1.0
    slots_free: int = 1


class Gateways:
    """``push_s`` and ``push_cpu_s``: an update's ingest time and CPU (added to ``cpu["gateway"]``);
    ``accepted(node, weight)``: called when one has landed in its slot."""

    def __init__(self, loop: EventLoop, names: list[str], slots: int, push_s: float, push_cpu_s: float,
                 accepted: Callable[[str, float], None], cpu: dict):
        self.loop, self.slots_total, self.push_s, self.push_cpu_s = loop, slots, push_s, push_cpu_s
        self._accepted, self.cpu = accepted, cpu
        self.gw = {n: _Gateway(slots_free=slots) for n in names}
        self.peak_slots = 0

    def start_round(self, ready: np.ndarray, weights: np.ndarray) -> None:
        """Clients (their ready times and weights) reach the gateways round-robin in time order."""
        order = np.argsort(ready, kind="stable")
        names = list(self.gw)
        for j, n in enumerate(names):
            sel = order[j::len(names)]
            g = self.gw[n]
            g.ready, g.weights, g.pos, g.wake_at = ready[sel], weights[sel], 0, -1.0
        for n in names:
            self.next(n)

    def taken(self, node: str) -> int:
        """Updates this node's gateway has taken in the current round."""
        return self.gw[node].pos

    def free(self, node: str, slots: int) -> None:
        """A fold gave slots back."""
        self.gw[node].slots_free += slots
        self.next(node)

    def next(self, node: str) -> None:
        g = self.gw[node]
        if g.busy or g.slots_free <= 0 or g.pos >= len(g.ready):
            return
        t = g.ready[g.pos]
        if t > self.loop.now:
            if g.wake_at != t:
                g.wake_at = t
                self.loop.at(t, self.next, node)
            return
        weight = float(g.weights[g.pos])
        g.pos += 1
        g.busy = True
        g.slots_free -= 1
        self.peak_slots = max(self.peak_slots, sum(self.slots_total - x.slots_free for x in self.gw.values()))
        self.cpu["gateway"] += self.push_cpu_s
        self.loop.at(self.loop.now + self.push_s, self._ingested, node, weight)

    def _ingested(self, node: str, weight: float) -> None:
        self.gw[node].busy = False
        self._accepted(node, weight)
        self.next(node)
