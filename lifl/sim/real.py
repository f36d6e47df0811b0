"""Real mode: a real ``lifl serve`` process, a bounded pool of client processes, real gRPC pushes.

Every round's result is pulled and compared with a float64 FedAvg of the same
updates, computed independently by the client processes as they push. The
server's process tree is sampled from /proc (CPU by gateway and functions,
PSS); the functions alive by role come from the server's Status RPC and cold
starts / warm reuses from its /metrics.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess  # nosec B404  # runs this package's own `lifl serve` and client processes
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..client import Client
from ..layout import Layout, TensorSpec
from ..procfs import cpu_seconds
from . import training
from .config import SimConfig
from .procstats import TreeSampler
from .records import RoundRecord, VariantRecord, compact_timeline
from .traces import Trace
from .workload import base_model, examples, model_specs, plan_round, update_bytes

log = logging.getLogger("lifl.sim.real")


def _env_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


@contextmanager
def serve(server: dict, command: list[str] | None = None, start_timeout: float = 60.0) -> Iterator[dict]:
    """Run ``lifl serve`` (or ``command``) on free ports; yields its ready info plus ``pid``."""
    tmp = Path(tempfile.mkdtemp(prefix="lifl-sim-"))
    ready = tmp / "ready.json"
    env = dict(os.environ, **{f"LIFL_{k.upper()}": _env_value(v) for k, v in server.items()})
    cmd = (command or [sys.executable, "-m", "lifl", "serve", "--port", "0", "--metrics-port", "0"]) + [
        "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)  # nosec B603  # argv list, no shell; the sim config names the command
    try:
        t0 = time.monotonic()
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited during start-up (status {proc.returncode})")
            if time.monotonic() - t0 > start_timeout:
                raise RuntimeError(f"the server did not start within {start_timeout:.0f}s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        info["pid"] = proc.pid
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


class ClientPool:
    """``processes`` client processes with ``threads`` pushes in flight each (JSON over pipes)."""

    def __init__(self, address: str, processes: int, threads: int, specs, seed: int, *, training_mode: bool,
                 lr: float, epochs: int, check: bool, task: str = "lifl.sim.training"):
        self.tmp = tempfile.TemporaryDirectory(prefix="lifl-sim-ref-")
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(processes):
                p = subprocess.Popen([sys.executable, "-m", "lifl.sim.client_proc"], stdin=subprocess.PIPE,  # nosec B603  # fixed argv
                                     stdout=subprocess.PIPE, text=True)
                self.procs.append(p)
                wire = Layout.from_specs(TensorSpec(n, d, tuple(s)) for n, s, d in specs).to_wire()
                init = {"address": address, "specs": wire, "seed": seed,
                        "threads": threads, "tmpdir": self.tmp.name, "index": i, "training": training_mode,
                        "task": task,
                        "lr": lr, "epochs": epochs, "check": check}
                p.stdin.write(json.dumps(init) + "\n")
                p.stdin.flush()
            for p in self.procs:
                self._reply(p)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _reply(p: subprocess.Popen) -> dict:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"client process {p.pid} exited (status {p.poll()})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"client process {p.pid}: {msg['error']}")
        return msg

    def run_round(self, rid: int, sim_round: int, items: list[list], t0: float) -> list[dict]:
        """Hand out items ([client, delay_s, weight], sorted by delay) round-robin; wait for every process."""
        for i, p in enumerate(self.procs):
            cmd = {"round": rid, "sim_round": sim_round, "t0": t0, "items": items[i::len(self.procs)]}
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        return [self._reply(p) for p in self.procs]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) or 0.0 for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"op": "exit"}) + "\n")
                p.stdin.close()
            except (OSError, ValueError):
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.tmp.cleanup()

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reference(replies: list[dict], names: list[str]) -> dict[str, np.ndarray]:
    """Σ wᵢxᵢ over every process's float64 partial sums (read back from .npy)."""
    total: dict[str, np.ndarray] = {}
    for r in replies:
        ref = r.get("ref")
        if ref is None:
            continue
        for i, k in enumerate(ref["names"]):
            a = np.load(Path(ref["dir"]) / f"{i}.npy", allow_pickle=False)
            total[k] = a if k not in total else total[k] + a
    return {k: total[k] for k in names if k in total}


def max_rel_error(result: dict[str, np.ndarray], sums: dict[str, np.ndarray], total_weight: float) -> float:
    """Worst relative error of a result against Σwx/Σw (integer tensors: exact after rounding, else inf)."""
    worst = 0.0
    for k, s in sums.items():
        ref, got = s / total_weight, result[k]
        if got.dtype.kind == "f":
            err = np.abs(got.astype(np.float64) - ref) / np.maximum(np.abs(ref), 1e-30)
            worst = max(worst, float(err.max(initial=0.0)))
        elif not np.array_equal(got, np.rint(ref).astype(got.dtype)):
            return float("inf")
    return worst


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    if port is None or port < 0:
        return {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # nosec B310  # fixed http:// URL on loopback
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_total") or s.name in ("lifl_updates_lost",):
                key = s.name + ("" if not s.labels else "{" + ",".join(f"{a}={b}" for a, b in sorted(s.labels.items())) + "}")
                out[key] = out.get(key, 0.0) + s.value
    return out


class _StatusPoller:
    """Functions alive by role over time, from the Status RPC."""

    def __init__(self, address: str, t0: float, period_s: float = 0.2):
        self.address, self.t0, self.period_s = address, t0, period_s
        self.t: list[float] = []
        self.alive: dict[str, list[int]] = {"leaf": [], "middle": [], "top": [], "idle": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lifl-sim-status")

    def _loop(self) -> None:
        with Client(self.address, timeout_s=5) as c:
            while not self._stop.wait(self.period_s):
                try:
                    rep = c.status()
                except Exception:  # the server is going away; the samples so far stand
                    return
                self.t.append(time.monotonic() - self.t0)
                counts = {k: 0 for k in self.alive}
                for wk in rep.workers:
                    counts[wk.role if wk.role in counts else "idle"] += 1
                for k, v in counts.items():
                    self.alive[k].append(v)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def run_real(cfg: SimConfig, trace: Trace, variant: str, server: dict, *,
             command: list[str] | None = None, on_round: Callable[[RoundRecord], None] | None = None
             ) -> VariantRecord:
    """Run every round of ``cfg`` against a real server; ``command`` replaces ``lifl serve`` (baselines)."""
    w, r = cfg.workload, cfg.run
    task = training.load_task(r.task) if r.training else None
    specs = task.SPECS if task else model_specs(w.model)
    nbytes = update_bytes(specs)
    weights = examples(trace, w)
    rec = VariantRecord(mode="real", variant=variant, server=dict(server))
    global_model = task.initial_model(w.seed) if task else None
    t_run = time.monotonic()
    with serve(server, command) as info:
        addr = info["address"]
        with TreeSampler(info["pid"]) as sampler, \
                ClientPool(addr, r.processes, r.threads, specs, w.seed, training_mode=r.training,
                           lr=r.learning_rate, epochs=r.local_epochs, check=r.check_exact, task=r.task) as pool, \
                Client(addr) as admin:
            base = base_model(specs, w.seed)
            rec.notes.append(f"real mode: server and client pool started in {time.monotonic() - t_run:.1f}s "
                             "(not in any round time)")
            t_run = time.monotonic()  # the run's clock starts at the first round
            with _StatusPoller(addr, t_run) as poller:
                arrivals = _rounds(cfg, trace, rec, pool, admin, base, global_model, nbytes, weights, t_run,
                                   on_round)
        gw, fn = sampler.cpu_since_start()
        rec.cpu["gateway"], rec.cpu["functions"] = gw, fn
        rec.peak_pss_bytes = sampler.peak_pss
        rec.timeline = compact_timeline(poller.t, poller.alive, arrivals)
        rec.counters = _scrape(info.get("metrics_port", -1))
    rec.wall_s = time.monotonic() - t_run
    rec.update_bytes = nbytes
    # client -> gateway, once; and gateway -> function again where updates go over a socket (no_shm)
    rec.bytes_between_processes = (nbytes * sum(rr.reported for rr in rec.rounds)
                                   + int(rec.counters.get("lifl_pipe_bytes_total", 0)))
    return rec


def _rounds(cfg: SimConfig, trace: Trace, rec: VariantRecord, pool: ClientPool, admin: Client, base: dict,
            global_model: dict | None, nbytes: int, weights: np.ndarray, t_run: float,
            on_round: Callable[[RoundRecord], None] | None) -> list[float]:
    """Each round: open, let the pool push, close if clients dropped out, pull, check; returns arrival times."""
    w, r = cfg.workload, cfg.run
    prev = 0
    arrivals: list[float] = []
    for rnd in range(1, w.rounds + 1):
        t_open = time.monotonic()
        plan = plan_round(trace, w, rnd, t_open - t_run, nbytes, weights)
        n_rep = int(plan.reports.sum())
        quorum = n_rep if n_rep < len(plan.clients) else 0
        if r.training:
            rid = admin.open_round(global_model, expected=len(plan.clients), quorum=quorum)
        elif prev:
            rid = admin.open_round(expected=len(plan.clients), quorum=quorum, from_round=prev)
        else:
            rid = admin.open_round(base, expected=len(plan.clients), quorum=quorum)
        order = np.argsort(plan.ready_s[plan.reports], kind="stable")
        idx, ready, wts = (plan.reporting[order], plan.ready_s[plan.reports][order],
                           plan.weights[plan.reports][order])
        items = [[int(i), float(d), float(x)] for i, d, x in zip(idx, ready, wts)]
        t0 = time.monotonic()
        replies = pool.run_round(rid, rnd, items, t0)
        t_pushed = time.monotonic()
        st = admin.round_info(rid)
        if st.state == "open":
            st = admin.close_round(rid)
        result = admin.pull(rid, wait_s=600)
        t_done = time.monotonic()
        st = admin.round_info(rid)
        pushed = sum(x["pushed"] for x in replies)
        arrivals.extend(t0 - t_run + done for x in replies for _, done in x["push_times"])
        refused: dict[str, int] = {}
        if n_rep < len(plan.clients):
            refused["dropped_out"] = len(plan.clients) - n_rep
        for x in replies:
            for k, v in x["refused"].items():
                refused[k] = refused.get(k, 0) + v
        err = None
        if r.check_exact and pushed:
            sums = reference(replies, list(result))
            weight = sum(x["weight"] for x in replies)
            err = max_rel_error(result, sums, weight)
            if abs(weight - st.total_weight) > 1e-9 * weight:
                err = float("inf")
                log.error("round %d: the server's total weight %g is not the pushed %g", rnd, st.total_weight, weight)
            if err > 1e-6 and rec.variant != "serverful":  # Flower's aggregate() sums in float32
                log.error("round %d: result differs from float64 FedAvg (max rel error %.3g)", rnd, err)
        acc = None
        if r.training:
            global_model = {k: np.array(v) for k, v in result.items()}
            acc = training.load_task(r.task).accuracy(global_model, w.seed)
        rr = RoundRecord(round=rnd, selected=len(plan.clients), reported=pushed, available=plan.available,
                         round_s=t_done - t_open, post_arrival_s=float(st.post_arrival_seconds),
                         push_phase_s=t_pushed - t0, start_s=t_open - t_run, refused=refused,
                         max_rel_error=err, accuracy=acc, total_weight=float(st.total_weight))
        rec.rounds.append(rr)
        if on_round:
            on_round(rr)
        prev = rid
        rec.cpu["clients"] += sum(x["cpu_s"] for x in replies)
    return arrivals
