"""Local runtime: aggregator functions are OS processes on this machine.

Functions are forked from a warm fork server (``zygote.py``) so a cold start
costs milliseconds; ``spawn="exec"`` starts ``python -m lifl.function``
instead. Either way a function talks JSON lines over one end of a Unix
socketpair, and a reader thread per function hands replies to the dispatcher.
Lifetimes are explicit: close() stops every function it started (exit command,
then SIGKILL) and the fork server; everything gets SIGKILL from the kernel if
the server dies first.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import struct
import subprocess  # nosec B404  # the exec spawn mode and the fork server run this package's own modules
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..control.model import Node, machine_node
from .base import NodeEvents, OnMessage, deliver, log


class LocalWorker:
    _ids = itertools.count(1)
    node = "local"
    async_start = False

    def __init__(self, sock: socket.socket, pid: int, on_message: OnMessage, t0: float,
                 proc: subprocess.Popen | None = None, start_timeout: float = 30.0):
        self.id = f"fn-{next(self._ids)}"
        self.pid, self.sock, self.proc = pid, sock, proc
        self._rfile = sock.makefile("rb")
        self._send_lock = threading.Lock()
        self._eof = threading.Event()
        sock.settimeout(start_timeout)
        try:
            line = self._rfile.readline()
        except OSError:
            line = b""
        sock.settimeout(None)
        if not line:
            self.kill()
            raise RuntimeError(f"aggregator function {self.id} exited during start-up")
        self.started = time.time()
        self.start_seconds = time.perf_counter() - t0
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read, name=f"lifl-{self.id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._rfile:
                deliver(self._on_message, self, json.loads(line))
        except (OSError, ValueError) as e:  # a torn line: the function is broken, treat it as gone
            if not isinstance(e, OSError):
                log.error("function %s sent an unreadable reply (%s); stopping it", self.id, e)
                self.kill()
        self._eof.set()
        if self.proc is not None:
            self.proc.wait()
        deliver(self._on_message, self, None)

    def send(self, cmd: dict, payloads=()) -> None:
        """One command line, then ``payloads`` (buffers) raw: the update bytes of the
        ``update_transport = "pipe"`` ablation, which ``cmd["inline"]`` announces."""
        data = json.dumps(cmd).encode() + b"\n"
        with self._send_lock:
            self.sock.sendall(data)
            for p in payloads:
                self.sock.sendall(p)

    def alive(self) -> bool:
        return not self._eof.is_set()

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            try:
                self.send({"op": "exit"})
            except OSError:
                pass
            if not self._eof.wait(timeout):
                self.kill()
                self._eof.wait(timeout)
        try:
            self.sock.close()
        except OSError:
            pass


class LocalRuntime:
    """Starts functions from one long-lived thread: the kernel's parent-death signal
    fires when the *thread* that forked a child exits, so forking from a short-lived
    reader thread would kill the replacement of a crashed function at once."""

    name = "local"
    head = "local"

    def __init__(self, arena, spawn: str = "zygote", workers: int = 1, fold_cores: int = 0):
        """``arena``: this machine's shared memory (the one node's store); ``workers`` and
        ``fold_cores``: how many functions may run here and the cores the planner may fill."""
        if spawn not in ("zygote", "exec"):
            raise ValueError(f"spawn must be 'zygote' or 'exec', got {spawn!r}")
        self.spawn, self.arena, self.workers, self.fold_cores = spawn, arena, workers, fold_cores
        self.events = NodeEvents()   # one machine: never loses a node
        self._workers: list[LocalWorker] = []
        self._lock = threading.Lock()
        self._forker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lifl-forker")
        self._zygote: subprocess.Popen | None = None
        self._zctrl: socket.socket | None = None

    # -- fork server ---------------------------------------------------------------
    def _start_zygote(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._zygote = subprocess.Popen([sys.executable, "-m", "lifl.runtime.zygote", "--fd", str(child.fileno())],  # nosec B603  # fixed argv: this interpreter and this package's fork server
                                        pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        parent.settimeout(30)
        if parent.recv(1) != b"R":
            raise RuntimeError("the function fork server did not start")
        parent.settimeout(None)
        self._zctrl = parent

    def _fork(self, on_message: OnMessage) -> LocalWorker:
        t0 = time.perf_counter()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.spawn == "exec":
                proc = subprocess.Popen([sys.executable, "-m", "lifl.function", "--fd", str(child.fileno())],  # nosec B603  # fixed argv: this interpreter and this package's function
                                        pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
                child.close()
                return LocalWorker(parent, proc.pid, on_message, t0, proc=proc)
            for attempt in (0, 1):
                if self._zygote is None or self._zygote.poll() is not None:
                    self._start_zygote()
                try:
                    socket.send_fds(self._zctrl, [b"S"], [child.fileno()])
                    raw = self._zctrl.recv(4)
                    if len(raw) == 4:
                        break
                except OSError:
                    pass
                self._zygote.kill()
                self._zygote.wait()
            else:
                raise RuntimeError("the function fork server keeps failing")
            child.close()
            return LocalWorker(parent, struct.unpack("<i", raw)[0], on_message, t0)
        except BaseException:
            child.close()
            parent.close()
            raise

    # -- Runtime interface ------------------------------------------------------------
    def prepare(self) -> None:
        """Start the fork server now (otherwise on the first cold start)."""
        if self.spawn == "zygote":
            self._forker.submit(self._start_zygote).result()

    def node_models(self) -> list[Node]:
        return [machine_node(self.head, self.workers, self.fold_cores, os.cpu_count() or 2, self.arena.budget)]

    def function_slots(self, node: str) -> int:
        return self.workers

    def node_alive(self, node: str) -> bool:
        return True

    def store(self, node: str):
        return self.arena

    def store_of(self, segment: str):
        return self.arena

    def gateways(self) -> dict[str, str]:
        return {}   # the server's own gateway is the only one

    def request_capacity(self, bundles: list[dict]) -> None:
        """One machine: nothing to ask for."""

    def metrics_texts(self) -> list[bytes]:
        """No other node's gateway: the server's registry (and its pool's) is all of /metrics."""
        return []

    def start_worker(self, on_message: OnMessage, node: str = "local") -> LocalWorker:
        w = self._forker.submit(self._fork, on_message).result()
        with self._lock:
            self._workers.append(w)
        return w

    def stop_worker(self, worker: LocalWorker) -> None:
        worker.stop()
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for w in workers:
            w.stop()
        if self._zygote is not None:
            try:
                self._zctrl.close()
            except OSError:
                pass
            try:
                self._zygote.wait(5)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait()
            self._zygote = None
        self._forker.shutdown(wait=False)

    def __enter__(self) -> "LocalRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
