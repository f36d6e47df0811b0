"""Start and stop real Flower + LIFL processes on loopback (used by tests/flower and benchmarks/bench_flower.py).

Everything started here runs in its own session (process group) and is stopped
through that group id: a SuperLink takes its SuperExec, ServerApp and (in
simulation) Ray workers with it. Nothing is ever looked up or killed by name.
A private ``FLWR_HOME`` keeps the user's Flower configuration untouched.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from benchmarks.procsampler import by_root

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s")


def _flwr_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace('"', '\\"') + '"'
    return repr(v)


def config_args(cfg: Mapping[str, object]) -> str:
    """{'lifl': True, 'out': '/x'} -> 'lifl=true out="/x"' (Flower's --run-config / --node-config syntax)."""
    return " ".join(f"{k}={_flwr_value(v)}" for k, v in cfg.items())


_LIFL_SERVER = """
import json, signal, sys
from lifl.config import ServerConfig
from lifl.server import EmbeddedServer
kw = json.loads(sys.argv[1])
srv = EmbeddedServer(ServerConfig(**kw)).start()
print("LIFL ready", srv.address, flush=True)
signal.signal(signal.SIGTERM, lambda *a: srv.stop())
signal.signal(signal.SIGINT, lambda *a: srv.stop())
srv.wait()
"""


#: What Ray prints when its own start-up times out (not the app's failure).
RAY_BOOT_FAILURES = ("Timed out waiting for file", "The current node timed out during startup")


@dataclass
class Stack:
    """A private FLWR_HOME plus the processes started for one test or benchmark."""
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    superlink_port: int = 0
    superlink: subprocess.Popen | None = None
    lifl: subprocess.Popen | None = None
    lifl_address: str = ""
    lifl_shm_prefix: str = "lifl"
    supernodes: list[subprocess.Popen] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)

    # -- environment ------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.home)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        return env

    def _start(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env={**self.env(), **(env or {})},
                             cwd=self.workdir, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    # -- LIFL ----------------------------------------------------------------------------
    def start_lifl(self, malloc_arena_max: int = 0, **server_config) -> str:
        """A LIFL server (``EmbeddedServer``) in its own process.

        ``malloc_arena_max`` > 0 sets glibc's ``MALLOC_ARENA_MAX`` for that process: the
        gateway serves each gRPC stream on its own thread, and by default glibc gives
        busy threads their own heaps (up to 8 per core), each keeping the chunk buffers
        it once held; 2 arenas keep a 30-client round's gateway about 1 GiB smaller.
        """
        port = free_port()
        kw = {"host": "127.0.0.1", "port": port, "metrics_port": -1, **server_config}
        self.lifl_shm_prefix = str(kw.get("shm_prefix", "lifl"))   # segments are <prefix>-<server pid>-<n>
        env = {"MALLOC_ARENA_MAX": str(int(malloc_arena_max))} if malloc_arena_max > 0 else None
        self.lifl = self._start("lifl", [sys.executable, "-c", _LIFL_SERVER, json.dumps(kw)], env=env)
        wait_port(port, 30, self.lifl, "LIFL server")
        self.lifl_address = f"127.0.0.1:{port}"
        return self.lifl_address

    def stop_lifl(self) -> None:
        if self.lifl is not None:
            self._stop(self.lifl)
            self.lifl = None

    # -- Flower ----------------------------------------------------------------------------
    def start_superlink(self, simulation: bool = False) -> int:
        self.superlink_port = free_port()
        cmd = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
               str(self.superlink_port), "--disable-runtime-dependency-installation"]
        if simulation:
            cmd.append("--simulation")
        self.superlink = self._start("superlink", cmd)
        wait_port(self.superlink_port, 60, self.superlink, "flower-superlink")
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n')
        return self.superlink_port

    def start_supernodes(self, n: int, node_config: Mapping[str, object] | None = None) -> list[subprocess.Popen]:
        for i in range(n):
            cfg = {"partition-id": len(self.supernodes), "num-partitions": n, **(node_config or {})}
            cmd = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.superlink_port}",
                   "--port", str(free_port()), "--node-config", config_args(cfg)]
            self.supernodes.append(self._start(f"supernode-{len(self.supernodes)}", cmd))
        return self.supernodes

    def flwr_run(self, app: str | Path, run_config: Mapping[str, object], *, num_supernodes: int = 0,
                 timeout: float = 300) -> subprocess.CompletedProcess:
        """``flwr run APP test --stream`` until the run ends (``num_supernodes`` > 0: a simulation run)."""
        cmd = [str(BIN / "flwr"), "run", str(app), "test", "--stream"]
        if run_config:
            cmd += ["--run-config", config_args(run_config)]
        if num_supernodes:
            cmd += ["--federation-config", f"num-supernodes={num_supernodes}"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env(),
                             cwd=self.workdir, start_new_session=True, text=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop(p)
            out, _ = p.communicate()
            raise TimeoutError(f"flwr run did not finish within {timeout}s:\n{out[-4000:]}") from None
        return subprocess.CompletedProcess(cmd, p.returncode, out, "")

    def flwr_run_simulation(self, app: str | Path, run_config: Mapping[str, object], *, num_supernodes: int,
                            produces: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """A simulation ``flwr run`` that should write ``produces``, run once more when Ray's own
        start-up timed out (its GCS, or its raylet registering within Ray's hard-coded 30 s, on a
        loaded small machine): that is the simulation engine failing to boot, not the app."""
        r = self.flwr_run(app, run_config, num_supernodes=num_supernodes, timeout=timeout)
        failed = r.returncode != 0 or not produces.exists()
        if failed and any(m in r.stdout + self.log("superlink") for m in RAY_BOOT_FAILURES):
            r = self.flwr_run(app, run_config, num_supernodes=num_supernodes, timeout=timeout)
        return r

    # -- teardown --------------------------------------------------------------------------
    @staticmethod
    def _stop(p: subprocess.Popen, grace: float = 10.0) -> None:
        if p.poll() is not None:
            try:
                os.killpg(p.pid, signal.SIGKILL)     # leftovers of an exited leader's group
            except (ProcessLookupError, PermissionError):
                pass
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def stop_supernode(self, i: int) -> None:
        self._stop(self.supernodes[i], grace=2)

    def kill_supernode(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and its ClientApp processes (its process group): a node that dies."""
        p = self.supernodes[i]
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)

    def close(self) -> None:
        threads = [threading.Thread(target=self._stop, args=(p,)) for p in reversed(self.procs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.procs.clear()

    def log(self, name: str) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- roles of the server side's processes (for benchmarks.procsampler.ProcSampler) -------------
def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def flower_role(pid: int, root: int, labels: Mapping[int, str]) -> str:
    """Role of a process in the server side: SuperLink / SuperExec / ServerApp / LIFL gateway / LIFL functions."""
    label = labels[root]
    if pid == root:
        return label
    if label == "superlink":
        cmd = cmdline(pid)
        if "flwr-serverapp" in cmd:
            return "serverapp"
        if "superexec" in cmd:
            return "superexec"
        return "superlink-other"
    if label == "lifl-gateway":
        return "lifl-functions"          # zygote (fork server) and the aggregator functions it forked
    return by_root(pid, root, labels)


def max_rel_diff(a_path: str | Path, b_path: str | Path, same_dtypes: bool = True) -> float:
    """max over tensors of ||a - b|| / ||a|| for two .npz models with the same keys, in the same order
    (and the same dtypes unless ``same_dtypes=False``)."""
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    if list(a.keys()) != list(b.keys()):
        raise AssertionError(f"different tensors: {list(a.keys())} vs {list(b.keys())}")
    worst = 0.0
    for k in a.keys():
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        if x.shape != y.shape or (same_dtypes and a[k].dtype != b[k].dtype):
            raise AssertionError(f"{k}: {a[k].dtype}{x.shape} vs {b[k].dtype}{y.shape}")
        worst = max(worst, float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)))
    return worst
