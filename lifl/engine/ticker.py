"""The control loop's thread: runs a step at the period the engine asks for, and never dies."""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("lifl.engine")


def guarded(what: str, step: Callable, *args):
    """Run one step of a control loop: an error is logged and the loop goes on (None returned)."""
    try:
        return step(*args)
    except Exception:
        log.exception("control loop: %s failed; continuing", what)
        return None


class Ticker:
    """Calls ``step()`` (guarded), then sleeps ``step``'s returned period (None: until woken).
    An idle engine returns None and burns no CPU at all."""

    def __init__(self, step: Callable[[], float | None], name: str = "lifl-ticker"):
        self._step = step
        self._wake = threading.Event()
        self._stop = False
        self._period: float | None = 0.05
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Ticker":
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._period)
            self._wake.clear()
            if self._stop:
                return
            try:
                self._period = self._step()
            except Exception:
                log.exception("control loop step failed; continuing")
                self._period = 0.5

    def stop(self, timeout: float = 2.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
