"""Per-client rate limits: a token bucket per identity, pure and driven by an injected clock.

A bucket holds up to ``burst`` calls and refills at ``rate`` calls per second; a call that finds
it empty is refused with the seconds until one call's worth has refilled, which the gateway
sends as ``retry-after-ms`` (the Python client waits that long and retries)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float          # calls per second refilled
    burst: float         # most calls in a row
    level: float = -1.0  # calls available now (-1: full, set on first use)
    stamp: float = 0.0   # clock reading at the last update

    def take(self, now: float) -> float | None:
        """Spend one call at ``now``: None when allowed, else the seconds until one is available."""
        if self.level < 0:
            self.level, self.stamp = self.burst, now
        self.level = min(self.burst, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return None
        return (1.0 - self.level) / self.rate

    def full(self, now: float) -> bool:
        return self.level < 0 or self.level + max(0.0, now - self.stamp) * self.rate >= self.burst


class RateLimiter:
    """Buckets by key (a client's identity). At most ``max_keys`` buckets are kept: the least
    recently used full bucket is forgotten first (forgetting a full bucket changes nothing), so a
    flood of identities cannot grow memory; when none is full the oldest goes anyway."""

    def __init__(self, rate: float, burst: float, clock, max_keys: int = 100_000):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.clock, self.max_keys = rate, burst, clock, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """None when ``key`` may make a call now, else the seconds until it may."""
        with self._lock:
            now = self.clock.monotonic()
            b = self._buckets.get(key)
            if b is None:
                self._evict(now)
                b = self._buckets[key] = TokenBucket(self.rate, self.burst)
            else:
                self._buckets.move_to_end(key)
            return b.take(now)

    def _evict(self, now: float) -> None:
        while len(self._buckets) >= self.max_keys:
            victim = next((k for k, b in self._buckets.items() if b.full(now)), None)
            self._buckets.pop(victim if victim is not None else next(iter(self._buckets)))

    def __len__(self) -> int:
        return len(self._buckets)
