"""Time as the engine sees it: deadlines, keep-alives and rates read an injected clock.

``SystemClock`` is the real one. ``ManualClock`` moves only when told to: tests and simulations
tick the engine at the instants they choose, so nothing races the machine's real clock."""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...        # wall-clock seconds (reported, e.g. a round's opening time)
    def monotonic(self) -> float: ...   # seconds for deadlines and intervals


class SystemClock:
    @staticmethod
    def time() -> float:
        return time.time()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


class ManualClock:
    """A clock that stands still until :meth:`advance`."""

    def __init__(self, start: float = 1_700_000_000.0):
        self._wall, self._mono = float(start), 0.0

    def time(self) -> float:
        return self._wall + self._mono

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._mono += seconds
