"""The gateway pool: more processes serving a gateway's port, one place deciding.

One Python gRPC server is one interpreter, and it, not the fold, caps what a node
ingests. With ``gateway_processes = N`` N gateway processes (``python -m
lifl.pool_gateway``) listen on the gateway's port (SO_REUSEPORT: the kernel
spreads connections over them); their parent holds the port bound but does not
listen on it, so that its one interpreter only decides (measured: as one of the
gateways it was the pool's bottleneck). The parent is the head (its port) or, on
the Ray runtime, a node's agent (the node's gateway port). Each process validates
a push and writes its chunks straight into a slot of its parent's arena — a
segment the parent created and the child only attaches — and asks the parent
everything that must be decided in one place: the round and its layout, "may this
client start?" (deduplication, and the stream's slot from the budget in the same
call), "complete in slot S", "this stream failed". Those calls are the Ray node
gateways' (``head_link``) plus operations for the parent's budget, carried as JSON
frames over a Unix socket (``pool_channel``: a connection per calling thread, a
fraction of a gRPC call's CPU in the parent, which decides for every process).
The parent decides slots from its own arena and passes the rest to its upstream:
the head's dispatcher, or, on a Ray node, the head over the node's ``HeadLink``.
Pull, GetRound and Status are relayed to the parent over a second Unix socket, a
gRPC server (and by a node on to the head).

A child that dies (even SIGKILL): its clients see UNAVAILABLE (the connection
drops) and retry; the parent abandons its streams in flight, returns the slots it
held, and starts a replacement. The child owns no segment, so nothing leaks.
The head's ``/metrics`` shows every process of its own pool summed, and a Ray node's
pool through that node's agent (``Runtime.metrics_texts``). Children keep their
metrics in files of the pool's private directory (prometheus_client's multiprocess
mode: each count is written to a shared mapping as it is made), so what a child had
counted stays in the sums when it dies — even SIGKILLed between two scrapes — and
its gauges go with it. A dead child's counts are then read once into the pool's
retired sum and its files removed: files for the live processes only, however often
processes are replaced.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
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
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import multiprocess

from .errors import LiflError
from .metrics import RetiredCounts
from .node_gateway import gateway_server
from .pool_channel import FrameServer
from .shm import BudgetExhausted, pid_alive

log = logging.getLogger("lifl.gateway_pool")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"   # read by prometheus_client when a child imports it
DIR_PREFIX = "lifl-pool-"
_STALE = re.compile(rf"^{DIR_PREFIX}(\d+)-")
START_TIMEOUT_S = 60.0


class PoolService:
    """The parent's side of the pool's channel. Slots come from the parent's ``arena`` (remembered
    per child, so that a dead child's are returned); everything else is decided by ``upstream``
    (``handle(req) -> dict``, refusals raised as :class:`LiflError`): the head's
    :class:`HeadService` for the head's pool, the node's :class:`HeadLink` for a Ray node's. The
    upstream sees every call as the parent's (``node``); streams in flight are remembered per
    child, so that a dead child's are abandoned there."""

    def __init__(self, upstream, arena, node: str = ""):
        self.upstream, self.arena, self.node = upstream, arena, node
        self._lock = threading.Lock()
        self.slots: dict[str, set[str]] = {}                      # child -> slots it holds (not accepted)
        self.streams: dict[str, set[tuple[str, int, str]]] = {}   # child -> (job, round, client) begun
        self.dead: set[str] = set()

    def handle(self, req: dict) -> dict:
        op, child = req["op"], req["node"]
        up = {k: v for k, v in req.items() if k not in ("size", "timeout")}
        up["node"] = self.node
        stream = (req["job"], int(req["round"]), req.get("client", ""))
        if op == "slot":
            return {"slot": self._slot(child, int(req["size"]), float(req["timeout"]))}
        if op == "release":
            with self._lock:
                self.slots.get(child, set()).discard(req["slot"])
            self.arena.release_slot(req["slot"])
            return {}
        if op in ("begin", "async_check"):   # with ``size``: the push's slot comes in the same call
            rep = self.upstream.handle(up)
            begun = op == "begin"   # a round's stream, in flight at the upstream until accepted or abandoned
            if begun and not self._track(child, stream):
                self._abandon(stream)
                raise LiflError("UNAVAILABLE", "this gateway process is being replaced; push again")
            if "size" not in req:
                return rep
            try:
                return {**rep, "slot": self._slot(child, int(req["size"]), float(req["timeout"]))}
            except BaseException:
                if begun:
                    self._untrack(child, stream)
                    self._abandon(stream)
                raise
        if op == "abandon":
            self._untrack(child, stream)
        if op == "accept":   # the engine owns the slot from here (it releases it after the fold)
            with self._lock:
                if child in self.dead:   # its slot went back when it died
                    raise LiflError("UNAVAILABLE", "this gateway process is being replaced; push again")
                self.slots.get(child, set()).discard(req["slot"])
                self.streams.get(child, set()).discard(stream)
            try:
                return self.upstream.handle(up)
            except BaseException:
                self._hold(child, req["slot"])   # not accepted: still the child's to give back
                raise
        return self.upstream.handle(up)

    def _track(self, child: str, stream) -> bool:
        with self._lock:
            if child in self.dead:
                return False
            self.streams.setdefault(child, set()).add(stream)
            return True

    def _untrack(self, child: str, stream) -> None:
        with self._lock:
            self.streams.get(child, set()).discard(stream)

    def _abandon(self, stream) -> None:
        job, rid, client = stream
        try:
            self.upstream.handle({"op": "abandon", "job": job, "round": rid, "client": client, "node": self.node})
        except LiflError as e:   # the round is gone already, or the head is unreachable (it forgets the node)
            log.info("abandoning %s's stream in round %d: %s", client[:64], rid, e.message)

    def _slot(self, child: str, size: int, timeout: float) -> str:
        try:
            seg = self.arena.acquire_slot(size, timeout=timeout)
        except BudgetExhausted as e:
            raise LiflError("RESOURCE_EXHAUSTED", f"{e}; retry later", retry_after_s=0.5) from None
        self._hold(child, seg.name)
        return seg.name

    def _hold(self, child: str, slot: str) -> None:
        with self._lock:
            if child not in self.dead:
                self.slots.setdefault(child, set()).add(slot)
                return
        self.arena.release_slot(slot)   # its child died meanwhile

    def forget_child(self, child: str) -> None:
        """A child died: abandon its streams in flight, give back its slots."""
        with self._lock:
            self.dead.add(child)
            slots = self.slots.pop(child, set())
            streams = self.streams.pop(child, set())
        for stream in sorted(streams):
            self._abandon(stream)
        for name in slots:
            self.arena.release_slot(name)
        log.warning("gateway process %s died: %d slot(s) returned, %d stream(s) abandoned", child, len(slots),
                    len(streams))


@dataclass
class Child:
    node: str
    proc: subprocess.Popen
    address: str   # its private port: reaches this one process (tests, probes)


class GatewayPool:
    """Starts and keeps ``config.gateway_count()`` gateway processes on ``port``, for a parent: the
    head (``gateway``: its :class:`Gateway`, ``upstream``: a :class:`HeadService` over its
    dispatcher) or a Ray node's agent (a :class:`NodeGateway` and its :class:`HeadLink`). The
    processes write into ``gateway.arena``; the parent's socket serves them ``gateway``'s other
    calls (Pull, GetRound, Status, Admin) and the pool's operations."""

    def __init__(self, config, gateway, upstream, port: int, node: str = ""):
        self.config, self.port, self.gateway = config, port, gateway
        self.secret = secrets.token_hex(16)
        self.service = PoolService(upstream, gateway.arena, node=node)
        reclaim_stale_dirs()
        # 0700: only this user may connect; named for this process, so a later pool can tell it stale
        self.directory = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        self.socket = f"unix:{os.path.join(self.directory, 'head.sock')}"   # relays: Pull, GetRound, Status, Admin
        self.calls_path = os.path.join(self.directory, "calls.sock")          # the pool's calls (pool_channel)
        self.metrics_dir = os.path.join(self.directory, "metrics")            # the children's counts (multiprocess)
        os.mkdir(self.metrics_dir, 0o700)
        self._calls: FrameServer | None = None
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()
        self._children: dict[int, Child] = {}
        self._gen = 0
        self._closing = threading.Event()
        self.restarts = 0
        self._metrics_lock = threading.Lock()   # a scrape reads the files a retirement removes
        self._retired = RetiredCounts()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "GatewayPool":
        gw = self.gateway
        n = self.config.gateway_count()
        # the pool's calls: a thread per child connection, so a slot wait starves no accept
        self._calls = FrameServer(self.calls_path, self.secret, self.service.handle).start()
        self._server = gateway_server(self.config, gw.handlers(), [gw.auth(relay_secret=self.secret)])
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
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, METRICS_DIR_ENV: self.metrics_dir})
        try:
            proc.stdin.write(json.dumps({"config": cfg, "head": self.socket, "calls": self.calls_path,
                                         "secret": self.secret, "node": node}) + "\n")
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
        self._retire_metrics(child.proc.pid)
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
        if self._calls is not None:
            self._calls.close()
            self._calls = None
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- views ---------------------------------------------------------------------------------
    def children(self) -> list[Child]:
        with self._lock:
            return [self._children[i] for i in sorted(self._children)]

    def metrics_texts(self) -> list[bytes]:
        """Every child's metrics, the dead ones' counters and histograms included, summed, in the
        text format (read from the files the children write: no call to any of them)."""
        live = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(live, self.metrics_dir)
        with self._metrics_lock:   # the texts are summed by the head's /metrics (metrics._Merged)
            return [generate_latest(live), self._retired.text()]

    def _retire_metrics(self, pid: int) -> None:
        """A dead child's counts join the retired sum and its files go; its gauges end with it."""
        files = glob.glob(os.path.join(self.metrics_dir, f"*_{pid}.db"))
        with self._metrics_lock:
            try:
                self._retired.add(multiprocess.MultiProcessCollector.merge(files, accumulate=True))
            except Exception:   # unreadable: keep the files (still summed from disk), lose nothing
                log.exception("gateway pool: the metrics files of pid %d could not be read; kept", pid)
                multiprocess.mark_process_dead(pid, self.metrics_dir)
                return
            for f in files:
                os.remove(f)


def reclaim_stale_dirs(tmp: str | None = None) -> list[str]:
    """Remove the private directories of pools whose parent died without closing them (a SIGKILL
    leaves the sockets and the children's metrics files): ``lifl-pool-{pid}-*``, this user's,
    that process gone. Returns the paths removed."""
    tmp = tmp or tempfile.gettempdir()
    gone = []
    for name in os.listdir(tmp):
        m = _STALE.match(name)
        path = os.path.join(tmp, name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if os.path.isdir(path) and not os.path.islink(path) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    if gone:
        log.warning("gateway pool: removed %d directory(ies) that dead servers left: %s", len(gone), gone)
    return gone


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
