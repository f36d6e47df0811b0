"""A real ``lifl serve`` process tree that a test or benchmark can SIGKILL and start again on the
same durable directory and port (the durability tests, ``benchmarks/crash_loop.py``).

The server runs in its own session, so ``kill_tree`` reaches it, its fork server and every
aggregator function at once — what a node losing power or an OOM killer does to a process
group. ``kill_gateway`` kills the server process alone (its functions then die by
``PR_SET_PDEATHSIG``). A test/benchmark harness: not shipped in ``lifl``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KillableServe:
    """``lifl serve --config <toml>`` with ``settings`` (durable_dir among them), on a fixed port."""

    def __init__(self, workdir: Path, **settings):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.settings = {"host": "127.0.0.1", "port": free_port(), "metrics_port": -1, **settings}
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.address = f"127.0.0.1:{self.settings['port']}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 60.0, **override) -> "KillableServe":
        cfg = self.workdir / "lifl.toml"
        cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {**self.settings, **override}.items()))
        ready = self.workdir / "ready.json"
        ready.unlink(missing_ok=True)
        self.starts += 1
        self.log = self.workdir / f"serve-{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "lifl", "serve", "--config", str(cfg),
                                          "--ready-file", str(ready)], cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill_tree()
                raise RuntimeError(f"lifl serve did not start (exit {self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.02)
        return self

    def tracebacks(self) -> int:
        """Tracebacks logged by every start so far (a background loop that logged and went on)."""
        return sum(p.read_text(errors="replace").count("Traceback") for p in self.workdir.glob("serve-*.log"))

    def recovered(self) -> tuple[int, int]:
        """(rounds, updates) the starts so far recovered from the durable directory, as logged."""
        import re
        found = [re.search(r"durable mode: (\d+) round\(s\) and (\d+) update\(s\) recovered", p.read_text(errors="replace"))
                 for p in self.workdir.glob("serve-*.log")]
        return sum(int(m[1]) for m in found if m), sum(int(m[2]) for m in found if m)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def _wait_group_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)
        raise RuntimeError(f"processes of lifl serve's group {self.proc.pid} outlived it")

    def kill_tree(self) -> None:
        """SIGKILL the server and every process of its session (fork server, functions)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._wait_group_gone()

    def kill_gateway(self) -> None:
        """SIGKILL the server process alone (the gateway); its functions follow it by themselves."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._wait_group_gone()

    def stop(self) -> int:
        """A graceful stop (SIGTERM); returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise

    def __enter__(self) -> "KillableServe":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_tree()
