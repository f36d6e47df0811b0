"""Local runtime: aggregator functions are OS processes on this machine.

Each function is ``python -m lifl.function`` with one end of a Unix socketpair;
commands and replies are JSON lines over it, and a reader thread per function
hands replies to the dispatcher. Process lifetimes are explicit: close() stops
every function it started (SIGTERM, then SIGKILL), and each function is
SIGKILLed by the kernel if the server dies first.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .base import OnMessage


class LocalWorker:
    _ids = itertools.count(1)

    def __init__(self, on_message: OnMessage, start_timeout: float = 30.0):
        self.id = f"fn-{next(self._ids)}"
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t0 = time.perf_counter()
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lifl.function", "--fd", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        child.close()
        self.pid = self.proc.pid
        self.sock = parent
        self._rfile = parent.makefile("rb")
        self._send_lock = threading.Lock()
        parent.settimeout(start_timeout)
        line = self._rfile.readline()
        parent.settimeout(None)
        if not line:
            self.proc.kill()
            raise RuntimeError(f"aggregator function {self.id} exited during start-up")
        self.started = time.time()
        self.start_seconds = time.perf_counter() - t0
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read, name=f"lifl-{self.id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._rfile:
                self._on_message(self, json.loads(line))
        except (OSError, ValueError):
            pass
        self.proc.wait()
        self._on_message(self, None)

    def send(self, cmd: dict) -> None:
        data = json.dumps(cmd).encode() + b"\n"
        with self._send_lock:
            self.sock.sendall(data)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            try:
                self.send({"op": "exit"})
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.sock.close()
        except OSError:
            pass


class LocalRuntime:
    """Starts functions from one long-lived thread: the kernel's parent-death signal
    fires when the *thread* that forked a child exits, so forking from a short-lived
    reader thread would kill the replacement of a crashed function at once."""

    name = "local"

    def __init__(self):
        self._workers: list[LocalWorker] = []
        self._lock = threading.Lock()
        self._forker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lifl-forker")

    def start_worker(self, on_message: OnMessage) -> LocalWorker:
        w = self._forker.submit(LocalWorker, on_message).result()
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
        self._forker.shutdown(wait=False)

    def __enter__(self) -> "LocalRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
