"""The interface every runtime (local processes, Ray actors) implements."""
from __future__ import annotations

from typing import Callable, Protocol

#: Called with (worker, reply dict) for every reply, and (worker, None) when it exits.
OnMessage = Callable[["Worker", "dict | None"], None]


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
