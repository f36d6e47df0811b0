"""Load estimation: arrival rate, fold time and where updates arrive — what the planner and the
autoscaler are fed. Plain state updated with explicit times (no clock of its own)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class LoadEstimator:
    """``decay``: weight kept by the arrival-rate average per ``decay_period_s`` (0.7 per 50 ms:
    a burst is seen within a few ticks and forgotten within a second or two); ``fold_keep``:
    weight kept by the fold-time average per fold."""

    decay: float = 0.7
    decay_period_s: float = 0.05
    fold_keep: float = 0.8
    floor_per_s: float = 0.01            # a rate this small is none (the average decays geometrically)
    arrivals_per_s: float = 0.0          # average of accepted updates per second
    fold_s: float = 0.0                  # average seconds to fold one update (0: none measured yet)
    last_round_rate: float = 0.0         # arrival rate of the last finished round
    node_share: dict[str, float] = field(default_factory=dict)   # last round's split of arrivals by node
    _since_tick: int = 0
    _last_tick: float | None = None
    _node_arrivals: collections.Counter = field(default_factory=collections.Counter)

    def arrived(self, node: str) -> None:
        self._since_tick += 1
        self._node_arrivals[node] += 1

    def tick(self, now: float) -> float:
        """Fold the arrivals since the last tick into the average; return it."""
        if self._last_tick is None:
            self._last_tick = now
        dt, self._last_tick = now - self._last_tick, now
        rate = self._since_tick / dt if dt > 0 else 0.0
        self._since_tick = 0
        keep = self.decay ** (dt / self.decay_period_s) if dt > 0 else 1.0
        self.arrivals_per_s = keep * self.arrivals_per_s + (1 - keep) * rate
        if self.arrivals_per_s < self.floor_per_s:
            self.arrivals_per_s = 0.0
        return self.arrivals_per_s

    def folded(self, seconds: float, updates: int) -> None:
        per = seconds / updates
        self.fold_s = per if not self.fold_s else self.fold_keep * self.fold_s + (1 - self.fold_keep) * per

    def round_finished(self, accepted: int, span_s: float) -> None:
        if span_s > 0:
            self.last_round_rate = accepted / span_s
        total = sum(self._node_arrivals.values())
        if total:  # the next round's plan starts from how arrivals split over nodes' gateways
            self.node_share = {n: c / total for n, c in self._node_arrivals.items()}
            self._node_arrivals.clear()

    @property
    def service_rate(self) -> float:
        return 1.0 / self.fold_s if self.fold_s else 0.0
