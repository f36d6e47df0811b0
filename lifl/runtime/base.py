"""The interface every runtime (local processes, Ray actors) implements, complete: functions,
nodes and their stores, node liveness and loss, and the gateways other nodes run. The engine
calls only this; it never asks which runtime it has."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from ..control.model import Node

log = logging.getLogger("lifl.runtime")


@dataclass(frozen=True)
class Reply:
    """What a function answered to one command (or what its runtime made of a failure)."""

    ok: bool
    seconds: float = 0.0
    error: str = ""
    lost_input: bool = False    # an input segment went down with its node (Ray)

    @classmethod
    def from_wire(cls, msg: dict) -> "Reply":
        return cls(bool(msg.get("ok")), float(msg.get("seconds", 0.0)), str(msg.get("error", "")),
                   bool(msg.get("lost_input", False)))


#: Called with (worker, reply) for every reply, and (worker, None) when it exits.
OnMessage = Callable[["Worker", "Reply | None"], None]


def deliver(on_message: OnMessage, worker: "Worker", msg: "dict | None") -> None:
    """Hand a reply to the engine from a reader thread. An error in the engine's callback is
    logged and the reader goes on: it must not pass for the function's death (a replacement
    would start while this function lives on, unread) nor end the reader silently."""
    try:
        on_message(worker, None if msg is None else Reply.from_wire(msg))
    except Exception:
        log.exception("the engine failed to handle %s of function %s", "the exit" if msg is None else "a reply",
                      worker.id)


class Worker(Protocol):
    id: str
    node: str
    pid: int
    started: float
    start_seconds: float
    async_start: bool           # True: it reports its own cold-start time once it is up

    def send(self, cmd: dict, payloads=()) -> None: ...
    def alive(self) -> bool: ...
    def kill(self) -> None: ...


class Store(Protocol):
    """A node's shared memory as the engine uses it."""

    def scratch(self, size: int): ...
    def release_scratch(self, name: str) -> None: ...
    def release_slot(self, name: str) -> None: ...


@dataclass
class NodeEvents:
    """Subscriptions the engine and server set: a node lost (with everything on it), a node that
    joined (an autoscaler added it), and the streams a lost node's gateway had open (job, round,
    client) so their clients may push again."""

    on_node_lost: Callable[[str], None] = lambda node: None
    on_node_joined: Callable[[str], None] = lambda node: None
    open_streams: Callable[[str], Iterable[tuple[str, int, str]]] = lambda node: ()


class Runtime(Protocol):
    name: str
    head: str                   # the node this server (and its gateway) runs on
    events: NodeEvents

    def prepare(self) -> None: ...
    def start_worker(self, on_message: OnMessage, node: str) -> Worker: ...
    def stop_worker(self, worker: Worker) -> None: ...
    def node_models(self) -> list[Node]: ...
    def function_slots(self, node: str) -> int: ...
    def node_alive(self, node: str) -> bool: ...
    def store(self, node: str) -> Store: ...
    def store_of(self, segment: str) -> Store: ...
    def gateways(self) -> dict[str, str]: ...
    def request_capacity(self, bundles: list[dict]) -> None: ...
    def metrics_texts(self) -> list[bytes]: ...   # other nodes' gateways' metrics (text format), for /metrics
    def close(self) -> None: ...
