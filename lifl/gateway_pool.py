"""The gateway pool: more processes serving the gRPC port, one engine deciding.

One Python gRPC server is one interpreter, and it, not the fold, caps what a node
ingests. With ``gateway_processes = N`` N gateway processes (``python -m
lifl.pool_gateway``) listen on the server's port (SO_REUSEPORT: the kernel spreads
connections over them); the head holds the port bound but does not listen on it, so
that its one interpreter only decides (measured: as one of the gateways it was the
pool's bottleneck). Each one validates a
push and writes its chunks straight into a slot of the head's arena — a segment
the head created and the child only attaches — and asks the head, over a Unix
domain socket, everything that must be decided in one place: the round and its
layout, "may this client start?" (deduplication), a slot from the budget,
"complete in slot S", "this stream failed". That is the Ray node gateways'
channel (``head_link``: JSON over one gRPC method, a random secret) plus two
operations for the shared budget. Pull, GetRound and Status are relayed to the
head over the same socket.

A child that dies (even SIGKILL): its clients see UNAVAILABLE (the connection
drops) and retry; the head abandons its streams in flight, returns the slots it
held, and starts a replacement. The child owns no segment, so nothing leaks.
``/metrics`` shows every process's metrics summed (each child serves its
registry over its private port; ``metrics.Metrics.sources``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess  # nosec B404  # starts this package's own gateway module
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from .errors import LiflError
from .head_link import SECRET_KEY, HeadService
from .node_gateway import gateway_server
from .shm import BudgetExhausted

log = logging.getLogger("lifl.gateway_pool")

POOL_SERVICE, METRICS_METHOD = "lifl.v1.Pool", "Metrics"
START_TIMEOUT_S = 60.0


class PoolService(HeadService):
    """The head's side of the pool's channel: the node gateways' operations, with updates routed
    to the head's own node, plus slots from the head's budget, remembered per child so that a
    dead child's are returned."""

    def __init__(self, dispatcher, arena, secret: str, asyncs=None):
        super().__init__(dispatcher, secret, asyncs=asyncs)
        self.arena = arena
        self.slots: dict[str, set[str]] = {}   # child -> slots it holds (acquired, not accepted)
        self.dead: set[str] = set()

    def engine_node(self, node: str) -> str:
        return ""   # pool children run on the head's node: the head's own leaves take their updates

    def handle(self, req: dict) -> dict:
        op, node = req["op"], req["node"]
        if op == "slot":
            return {"slot": self._slot(node, int(req["size"]), float(req["timeout"]))}
        if op == "release":
            with self._lock:
                self.slots.get(node, set()).discard(req["slot"])
            self.arena.release_slot(req["slot"])
            return {}
        if op == "accept":
            with self._lock:   # the engine owns the slot from here (it releases it after the fold)
                self.slots.get(node, set()).discard(req["slot"])
            try:
                return super().handle(req)
            except BaseException:
                self._hold(node, req["slot"])   # not accepted: still the child's to give back
                raise
        return super().handle(req)

    def _slot(self, node: str, size: int, timeout: float) -> str:
        try:
            seg = self.arena.acquire_slot(size, timeout=timeout)
        except BudgetExhausted as e:
            raise LiflError("RESOURCE_EXHAUSTED", f"{e}; retry later", retry_after_s=0.5) from None
        self._hold(node, seg.name)
        return seg.name

    def _hold(self, node: str, slot: str) -> None:
        with self._lock:
            if node not in self.dead:
                self.slots.setdefault(node, set()).add(slot)
                return
        self.arena.release_slot(slot)   # its child died meanwhile

    def forget_child(self, node: str) -> None:
        """A child died: abandon its streams in flight, give back its slots."""
        with self._lock:
            self.dead.add(node)
            slots = self.slots.pop(node, set())
        for job, rid, client in self.forget_node(node):
            try:
                self.dispatcher.abandon(self.dispatcher.get(job, rid), client)
            except LiflError:
                pass   # the round is gone already
        for name in slots:
            self.arena.release_slot(name)
        log.warning("gateway process %s died: %d slot(s) returned, its streams abandoned", node, len(slots))


@dataclass
class Child:
    node: str
    proc: subprocess.Popen
    address: str   # its private port (metrics, tests)


class GatewayPool:
    """Starts and keeps ``config.gateway_count()`` gateway processes on ``port``."""

    def __init__(self, config, arena, dispatcher, gateway, port: int):
        self.config, self.port, self.gateway = config, port, gateway
        self.secret = secrets.token_hex(16)
        self.service = PoolService(dispatcher, arena, self.secret, asyncs=gateway.asyncs)
        self._dir = tempfile.mkdtemp(prefix="lifl-pool-")   # 0700: only this user may connect
        self.socket = f"unix:{os.path.join(self._dir, 'head.sock')}"
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()
        self._children: dict[int, Child] = {}
        self._gen = 0
        self._closing = threading.Event()
        self.restarts = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "GatewayPool":
        gw = self.gateway
        # a thread for every call the children may have waiting here at once (a slot wait holds
        # one): fewer, and waits for slots could starve the accepts that free them
        n = self.config.gateway_count()
        self._server = gateway_server(self.config, gw.handlers() + [self.service.handler()], [gw.auth()],
                                      threads=n * (self.config.grpc_threads + 4) + 8)
        if not self._server.add_insecure_port(self.socket):
            raise OSError(f"gateway pool: cannot listen on {self.socket}")
        self._server.start()
        with ThreadPoolExecutor(max_workers=max(1, n)) as ex:
            children = list(ex.map(self._spawn, range(1, n + 1)))
        for i, c in enumerate(children, start=1):
            self._adopt(i, c)
        log.info("gateway pool: %d processes on port %d (pids %s)", n, self.port,
                 [c.proc.pid for c in children])
        return self

    def _spawn(self, index: int) -> Child:
        with self._lock:
            self._gen += 1
            node = f"gw{index}.{self._gen}"
        cfg = {**dataclasses.asdict(self.config), "port": self.port, "metrics_port": -1}
        proc = subprocess.Popen([sys.executable, "-m", "lifl.pool_gateway"],  # nosec B603  # our own module, no shell
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            proc.stdin.write(json.dumps({"config": cfg, "head": self.socket, "secret": self.secret,
                                         "node": node}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline().strip()
        except OSError:
            line = ""
        if not line.startswith("READY "):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"gateway process {node} did not start (it said {line!r}; see its log)")
        return Child(node, proc, line.split()[1])

    def _adopt(self, index: int, child: Child) -> None:
        with self._lock:
            self._children[index] = child
        threading.Thread(target=self._watch, args=(index, child), name=f"lifl-pool-{child.node}",
                         daemon=True).start()

    def _watch(self, index: int, child: Child) -> None:
        """Wait for the child to exit; unless the pool is closing, clean up after it and replace it."""
        code = child.proc.wait()
        if self._closing.is_set():
            return
        log.error("gateway process %s (pid %d) exited with %s; replacing it", child.node, child.proc.pid, code)
        self.service.forget_child(child.node)
        delay = 0.1
        while not self._closing.is_set():
            try:
                new = self._spawn(index)
            except Exception:
                log.exception("gateway pool: starting a replacement for %s failed; retrying", child.node)
                self._closing.wait(delay)
                delay = min(5.0, delay * 2)
                continue
            if self._closing.is_set():
                _stop(new.proc, 1.0)
                return
            self.restarts += 1
            self._adopt(index, new)
            return

    def close(self, grace: float = 1.0) -> None:
        self._closing.set()
        with self._lock:
            children = list(self._children.values())
            self._children.clear()
        for c in children:
            _stop(c.proc, grace + 5.0)
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- views ---------------------------------------------------------------------------------
    def children(self) -> list[Child]:
        with self._lock:
            return [self._children[i] for i in sorted(self._children)]

    def metrics_texts(self) -> list[bytes]:
        """Every live child's metrics in the text format (a dead one's are gone with it)."""
        out = []
        for c in self.children():
            try:
                with grpc.insecure_channel(c.address) as ch:
                    out.append(ch.unary_unary(f"/{POOL_SERVICE}/{METRICS_METHOD}")(
                        b"", metadata=((SECRET_KEY, self.secret),), timeout=2.0))
            except grpc.RpcError as e:
                log.warning("gateway process %s: no metrics (%s)", c.node, e.code())
        return out


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` (0: any free port) with SO_REUSEPORT and do not listen: the pool's
    processes can then bind it too, and only they receive connections."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise OSError(e.errno, f"cannot bind {host}:{port} for the gateway pool: {e.strerror}") from None
    return s


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """Closing stdin asks a child to drain and exit; SIGKILL if it does not."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
