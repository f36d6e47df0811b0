"""The interface every runtime (local processes, Ray actors) implements."""
from __future__ import annotations

import logging
from typing import Callable, Protocol

#: Called with (worker, reply dict) for every reply, and (worker, None) when it exits.
OnMessage = Callable[["Worker", "dict | None"], None]

log = logging.getLogger("lifl.runtime")


def deliver(on_message: OnMessage, worker: "Worker", msg: "dict | None") -> None:
    """Hand a reply to the engine from a reader thread. An error in the engine's callback is
    logged and the reader goes on: it must not pass for the function's death (a replacement
    would start while this function lives on, unread) nor end the reader silently."""
    try:
        on_message(worker, msg)
    except Exception:
        log.exception("the engine failed to handle %s of function %s", "the exit" if msg is None else "a reply",
                      getattr(worker, "id", "?"))


class Worker(Protocol):
    id: str
    node: str
    pid: int
    started: float

    def send(self, cmd: dict) -> None: ...
    def alive(self) -> bool: ...
    def kill(self) -> None: ...


class Runtime(Protocol):
    name: str

    def start_worker(self, on_message: OnMessage, node: str | None = None) -> Worker: ...
    def stop_worker(self, worker: Worker) -> None: ...
    def close(self) -> None: ...
