"""The function pool: starts aggregator functions, binds them to roles, and feeds each its commands
one at a time from its own queue.

Serverless: nothing runs until a role needs a function. Which function takes a role is
``control.autoscaler.choose_function``'s decision (a warm idle one, a cold start, or sharing a
busy one); this module only executes it. A function that dies while it starts is retried
(``START_ATTEMPTS`` in all) before anything fails. The pool is not thread-safe: the engine calls
it under its lock.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
from typing import Any, Callable

from ..control.autoscaler import choose_function
from ..control.model import Instance, InstanceState
from ..errors import LiflError
from .clock import Clock

START_ATTEMPTS = 3

log = logging.getLogger("lifl.engine")


class PooledFunction:
    """A function plus what the engine knows about it."""

    def __init__(self, handle, now: float):
        self.handle = handle
        self.queue: collections.deque = collections.deque()   # tasks waiting for it
        self.current = None                                   # the task it is running
        self.layouts: set[int] = set()                        # rounds whose layout it was sent
        self.folds = 0
        self.updates_folded = 0
        self.role = "idle"
        self.dead = False
        self.bindings = 0                                     # leaves of unfinished rounds it carries
        self.retiring = False                                 # no reuse: stops once its work is done
        self.idle_since = now
        self.node = handle.node

    def state(self) -> InstanceState:
        if self.current is not None or self.queue:
            return InstanceState.BUSY
        return InstanceState.WARM if self.bindings else InstanceState.IDLE

    def instance(self) -> Instance:
        return Instance(self.handle.id, self.node, self.state(), self.role, self.idle_since)


class FunctionPool:
    """``wire(task)``: the command a function reads for a task; ``next_work(fn)``: a task for an idle
    function that has nothing queued (its leaves' pending updates), or None."""

    def __init__(self, runtime, metrics, clock: Clock, *, max_functions: int, on_message: Callable,
                 wire: Callable[[Any], dict], next_work: Callable[[PooledFunction], Any], fold_delay_s: float = 0.0,
                 reuse: bool = True, inline_updates: bool = False):
        """``reuse`` false and ``inline_updates`` true are ablations (``reuse_functions``,
        ``update_transport = "pipe"``): every role a fresh function that stops when its work
        is done; update bytes sent over the function's socket instead of read in place."""
        self.runtime, self.metrics, self.clock = runtime, metrics, clock
        self.fold_delay_s = fold_delay_s   # fault injection: a window to kill a function mid-command
        self.max_functions, self.reuse, self.inline_updates = max_functions, reuse, inline_updates
        self._on_message, self._wire, self._next_work = on_message, wire, next_work
        self.functions: list[PooledFunction] = []
        self.launching: dict[str, int] = {}   # starts reserved (``reserve``) and running off the lock
        self._seq = itertools.count(1)

    # -- starting and binding ----------------------------------------------------------------
    def launch(self, node: str):
        """Start a function's process or actor on ``node``, retrying one that dies while it starts;
        when none can start, UNAVAILABLE with the last reason. Touches no pool state: it may
        run outside the engine's lock (``reserve`` first, ``adopt`` after)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self.runtime.start_worker(self._on_message, node)
            except Exception as e:
                self.metrics.function_failures.inc()
                log.warning("aggregator function start %d/%d failed: %s", attempt, START_ATTEMPTS, e)
                if attempt == START_ATTEMPTS:
                    raise LiflError("UNAVAILABLE", f"no aggregator function could start ({START_ATTEMPTS} "
                                                   f"attempts; last: {e}); retry later") from e

    def adopt(self, handle) -> PooledFunction:
        fn = PooledFunction(handle, self.clock.monotonic())
        self.functions.append(fn)
        self.metrics.cold_starts.inc()
        if not handle.async_start:  # a Ray actor reports it once it is up
            self.metrics.cold_start_seconds.observe(handle.start_seconds)
        return fn

    def start(self, node: str) -> PooledFunction:
        """Start a function on ``node`` now (under the engine's lock: replacements, pre-starts)."""
        return self.adopt(self.launch(node))

    def _choose(self, node: str, role: str):
        here = [f for f in self.functions if f.node == node]
        starting = sum(self.launching.values())
        can_start = (len(self.functions) + starting < self.max_functions
                     and len(here) + self.launching.get(node, 0) < self.runtime.function_slots(node))
        candidates = here if self.reuse or not can_start else []   # no reuse: fresh unless the caps stop it
        return here, choose_function([f.instance() for f in candidates], node, role, can_start,
                                     {f.handle.id: f.bindings + len(f.queue) for f in here})

    def reserve(self, node: str, role: str) -> bool:
        """Would binding ``role`` on ``node`` start a function? If so the start is reserved (it
        counts against the caps) and the caller must ``launch`` it and ``release`` the reservation."""
        if self._choose(node, role)[1].how != "cold":
            return False
        self.launching[node] = self.launching.get(node, 0) + 1
        return True

    def release(self, node: str) -> None:
        self.launching[node] -= 1

    def bind(self, node: str, role: str, fresh: PooledFunction | None = None) -> tuple[PooledFunction, str]:
        """A function for a role on ``node``; returns it and how it was had (warm, cold, shared).
        ``fresh``: one just started for this role off the lock (``launch``, ``adopt``), taken
        if it is still free."""
        if fresh is not None and fresh in self.functions and fresh.state() is InstanceState.IDLE:
            fn, how = fresh, "cold"
        else:
            here, choice = self._choose(node, role)
            how = choice.how
            if how == "cold":
                fn = self.start(node)
            else:
                fn = next(f for f in here if f.handle.id == choice.instance)
                self.metrics.warm_reuses.inc()
        fn.bindings += 1
        fn.role = role
        return fn, how

    def unbind(self, fn: PooledFunction) -> None:
        fn.bindings -= 1
        if fn.bindings == 0:
            fn.idle_since = self.clock.monotonic()
            if not self.reuse:
                self._retire(fn)

    def _retire(self, fn: PooledFunction) -> None:
        """No reuse: a function whose roles are done stops once its queue is empty."""
        fn.retiring = True
        self._stop_if_retired(fn)

    def _stop_if_retired(self, fn: PooledFunction) -> None:
        if fn.retiring and fn.bindings == 0 and fn.current is None and not fn.queue and fn in self.functions:
            self.stop(fn)

    def find(self, handle) -> PooledFunction | None:
        return next((f for f in self.functions if f.handle is handle), None)

    # -- commands -------------------------------------------------------------------------------
    def enqueue(self, fn: PooledFunction, task) -> None:
        fn.queue.append(task)
        self.pump(fn)

    def pump(self, fn: PooledFunction) -> None:
        """Send ``fn`` its next command if it is idle: queued tasks first, then its leaves' updates."""
        if fn.current is not None or fn.dead:
            return
        task = fn.queue.popleft() if fn.queue else self._next_work(fn)
        if task is None:
            fn.role = "idle"
            self._stop_if_retired(fn)
            return
        cmd = self._wire(task)
        cmd["seq"] = next(self._seq)
        if self.fold_delay_s and cmd["op"] == "fold":
            cmd["delay_s"] = self.fold_delay_s
        lid = cmd.get("layout")
        if lid is not None and lid not in fn.layouts and task.run is not None:
            cmd["specs"] = task.run.round.layout.to_wire()
            fn.layouts.add(lid)
        payloads = self._inline(cmd, task) if self.inline_updates and cmd.get("updates") else ()
        fn.current = task
        try:
            fn.handle.send(cmd, payloads)
        except OSError:
            pass  # its death is reported by the reader thread

    def _inline(self, cmd: dict, task) -> list:
        """The ``update_transport = "pipe"`` ablation: the updates' bytes go with the command."""
        # whole slots: an encoded update's slot is its encoded bytes and the trailer naming the encoding
        bufs = [self.runtime.store_of(name).get(name).buf for name, _ in cmd["updates"]]
        cmd["inline"] = [[name, len(b)] for (name, _), b in zip(cmd["updates"], bufs)]
        self.metrics.pipe_bytes.inc(sum(len(b) for b in bufs))
        return bufs

    def finished(self, fn: PooledFunction):
        """The function replied: its current task, now off it."""
        task, fn.current = fn.current, None
        return task

    def remove(self, fn: PooledFunction) -> list:
        """Take a dead function out of the pool; returns its unfinished tasks (running first)."""
        fn.dead = True
        if fn in self.functions:
            self.functions.remove(fn)
        tasks = ([fn.current] if fn.current is not None else []) + list(fn.queue)
        fn.current, fn.queue = None, collections.deque()
        return tasks

    def stop(self, fn: PooledFunction) -> None:
        """Stop an idle function (scale down), off the engine's lock: stopping waits for the process."""
        self.functions.remove(fn)
        self.metrics.scale_downs.inc()
        threading.Thread(target=self.runtime.stop_worker, args=(fn.handle,), daemon=True).start()

    def instances(self) -> tuple[Instance, ...]:
        return tuple(f.instance() for f in self.functions)
