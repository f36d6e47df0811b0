"""Costs measured on this machine, which the virtual-time model replays (cached per machine and size).

* fold: ``lifl.fold`` kernels on the model's layout — one update alone, a fused
  batch of 16 (giving the fuse speed-up), over updates not in cache (as slots are), one
  float64 partial, the finalize;
* function: a real aggregator function started by the local runtime (cold start), and the
  round trip of one command to it and back (every fold, partial and finalize pays it);
* ingest: the gateway is the bottleneck while many clients push at once, so it is
  measured as one: real rounds of this model's updates through a real ``lifl serve``
  from the real client pool, every stream of the pool in flight (processes x
  threads), at two client counts; round seconds = a + b * clients gives the
  gateway's seconds per push under that load (b) and a round's own cost (a: open,
  hand-out to the pool, close, pull, less the last fold and the finalize);
* pipe: the ``update_transport = "pipe"`` ablation's transfer, this model's update
  bytes sent over a socket to another process that reads them into a fresh buffer
  (what the engine and a function do), seconds and sender CPU per byte;
* serverful: Flower's ``aggregate`` over a batch of this model's updates.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..layout import Layout, TensorSpec

log = logging.getLogger("lifl.sim.calibrate")
_VERSION = 7


@dataclass(frozen=True)
class Costs:
    push_overhead_s: float     # gateway seconds per push (measured at the model's update size: all of it)
    ingest_Bps: float          # gateway bytes/s beyond that (inf where measured at the model's size)
    update_s: float            # fold one update alone
    fuse_speedup: float        # per-update speed-up of a fused batch of 16 (FoldCosts.fuse_speedup)
    partial_s: float           # fold one float64 partial
    finalize_s: float
    cold_start_s: float
    flower_per_update_s: float | None  # Flower aggregate(), per update of this model (None: flwr absent)
    gateway_cpu_push_s: float = 0.0      # gateway CPU-seconds per push, whatever its size
    gateway_cpu_per_byte: float = 0.0    # and per byte beyond that
    round_overhead_s: float = 0.0        # open + hand-out + close + pull of a round, beyond its pushes
    command_s: float = 0.0               # one command's round trip, engine -> function -> reply
    pipe_s_per_byte: float = 0.0         # no_shm: seconds per update byte sent to a function over its socket
    pipe_cpu_per_byte: float = 0.0       # no_shm: the sender's (gateway's) CPU-seconds per such byte

    def push_s(self, nbytes: int) -> float:
        return self.push_overhead_s + nbytes / self.ingest_Bps

    def push_cpu_s(self, nbytes: int) -> float:
        return self.gateway_cpu_push_s + nbytes * self.gateway_cpu_per_byte


def _median_time(fn, repeat: int = 5) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure_fold(specs) -> dict:
    """Fold, partial, finalize and Flower aggregate seconds for this layout."""
    from .. import fold
    from .workload import base_model, client_update
    base = base_model(specs, 0)
    layout = Layout.from_arrays(base)
    ups = [client_update(base, 0, 0, i) for i in range(4)]
    bufs = []
    for u in ups:
        b = bytearray(layout.total_size)
        layout.pack_into(u, b)
        bufs.append(b)
    # updates come from slots that are not in cache: fold distinct copies, ~192 MiB of them
    copies = max(4, min(512, (192 * 2**20) // max(1, layout.total_size)))
    bufs = [bytearray(bufs[i % 4]) for i in range(copies)]
    views = [fold.UpdateViews(layout, b) for b in bufs]
    acc = np.zeros(layout.numel, np.float64)
    nxt = itertools.count()

    def take(k):
        return [views[next(nxt) % copies] for _ in range(k)]
    one = _median_time(lambda: fold.fold_updates(acc, layout, take(1), [1.0]), 9)
    sixteen = _median_time(lambda: fold.fold_updates(acc, layout, take(16), [1.0] * 16), 5)
    # batch_seconds(t, k, F) = t((1 - 1/F) + k/F)  =>  F = (k - 1) / (T_k / t - 1)
    ratio = sixteen / one
    fuse = max(1.0, 15.0 / max(ratio - 1.0, 1e-9)) if ratio < 16 else 1.0
    part = np.ones(layout.numel, np.float64)
    partial = _median_time(lambda: fold.fold_partials(acc, [part]))
    out = bytearray(layout.total_size)
    fin = _median_time(lambda: fold.finalize(np.abs(acc) + 1.0, layout, 3.0, out), 3)
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError:  # the serverful baseline needs the flower extra
        flower = None
    else:
        res = [([u[k] for k in u], 10 + i) for i, u in enumerate(ups * 2)]
        flower = _median_time(lambda: aggregate(res), 3) / len(res)
    return {"update_s": one, "fuse_speedup": min(fuse, 16.0), "partial_s": partial, "finalize_s": fin,
            "flower_per_update_s": flower}


def measure_function(n: int = 3, commands: int = 40) -> dict:
    """A real function's cold start (started by the local runtime) and one command's round trip
    (engine -> function -> reply, a command that does nothing), which every fold, partial and
    finalize pays on top of its arithmetic."""
    import threading
    from ..runtime.local import LocalRuntime
    starts, trips = [], []
    got = threading.Event()
    with LocalRuntime(arena=None) as rt:   # only starts functions: no segments
        rt.prepare()
        for _ in range(n):
            w = rt.start_worker(lambda _w, msg: got.set() if msg is not None else None)
            starts.append(w.start_seconds)
            for i in range(commands):
                got.clear()
                t = time.perf_counter()
                w.send({"op": "forget", "segments": [], "seq": i})
                if not got.wait(10):
                    raise RuntimeError("a calibration function did not answer")
                trips.append(time.perf_counter() - t)
            rt.stop_worker(w)
    return {"cold_start_s": statistics.median(starts), "command_s": statistics.median(trips)}


def _calibration_rounds(model: str, counts, rounds: int, processes: int, threads: int, check: bool):
    """Real rounds of ``model`` at each client count, all clients at once, on one ``lifl serve`` and
    one client pool (``check``: the clients keep their float64 reference sums as in a checked run;
    on a small machine that work competes with the gateway). Returns ({count: [round seconds]},
    the gateway's CPU-seconds per push over all of them)."""
    from ..client import Client
    from ..procfs import cpu_seconds
    from .config import RunSpec, SimConfig, Workload
    from .real import ClientPool, _rounds, serve
    from .records import VariantRecord
    from .traces import generate
    from .workload import base_model, examples, model_specs, update_bytes
    specs = model_specs(model)
    server = {"metrics_port": -1, "shm_prefix": f"liflcal{os.getpid()}"}
    times, pushed = {}, 0
    with serve(server) as info, Client(info["address"]) as admin, \
            ClientPool(info["address"], processes, threads, specs, 0, training_mode=False, lr=1.0, epochs=1,
                       check=check) as pool:
        cpu0 = cpu_seconds(info["pid"]) or 0.0
        for n in counts:
            cfg = SimConfig(Workload(rounds=rounds, clients_per_round=n, model=model),
                            run=RunSpec(mode="real", processes=processes, threads=threads, check_exact=check,
                                        progress=False)).validate()
            trace = generate(cfg.trace, n)
            rec = VariantRecord(mode="real", variant="calibration", server=server)
            _rounds(cfg, trace, rec, pool, admin, base_model(specs, 0), None, update_bytes(specs),
                    examples(trace, cfg.workload), time.monotonic(), None)
            times[n] = [r.round_s for r in rec.rounds]
            pushed += sum(r.reported for r in rec.rounds)
        cpu = (cpu_seconds(info["pid"]) or 0.0) - cpu0
    return times, cpu / max(1, pushed)


def ingest_counts(nbytes: int, pushes: int) -> tuple[int, int]:
    """The two client counts of the ingest calibration: ``pushes`` and a quarter of it, fewer for
    large updates (at most ~512 MiB pushed per round)."""
    n2 = max(8, min(pushes, (512 * 2**20) // max(1, nbytes)))
    return max(4, n2 // 4), n2


def measure_ingest(model: str, nbytes: int, processes: int, threads: int, pushes: int = 400,
                   tail_s: float = 0.0, check: bool = False) -> dict:
    """The gateway as the bottleneck it is when every client arrives at once: real rounds of this
    model's updates at two client counts, every stream of the pool in flight, the pool doing what
    it does in the run (``check``); the median round of five at each count (this machine may be
    shared) gives round_s = a + b * clients. ``tail_s`` (the last fold and the finalize, which the
    model adds itself) is taken out of a."""
    times, cpu = _calibration_rounds(model, ingest_counts(nbytes, pushes), 5, processes, threads, check)
    pts = [(n, statistics.median(t)) for n, t in times.items()]
    (n1, t1), (n2, t2) = pts
    per_push = max((t2 - t1) / (n2 - n1), 1e-6)
    return {"push_overhead_s": per_push, "ingest_Bps": float("inf"), "gateway_cpu_push_s": cpu,
            "gateway_cpu_per_byte": 0.0, "round_overhead_s": max(0.0, t1 - n1 * per_push - tail_s),
            "ingest_points": pts}


_READER = """
import socket, sys, time
s = socket.socket(fileno=int(sys.argv[1]))
r = s.makefile("rb")
for line in r:
    size, count = map(int, line.split())
    if not size:
        break
    c0 = time.process_time()
    for _ in range(count):
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            got += r.readinto(view[got:])
    s.sendall(("%f\\n" % (time.process_time() - c0)).encode())
"""


def measure_pipe(nbytes: int, repeat: int = 3) -> dict:
    """Seconds and sender CPU per byte of an update sent over a socket to another process that
    reads it into a fresh buffer, as ``update_transport = "pipe"`` does (engine -> function)."""
    import socket
    import subprocess  # nosec B404  # runs this package's own reader process (fixed argv)
    count = max(4, min(64, (128 * 2**20) // max(1, nbytes)))
    a, b = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", _READER, str(b.fileno())], pass_fds=[b.fileno()])  # nosec B603  # fixed argv: this interpreter and a reader defined here
    b.close()
    src = memoryview(np.random.default_rng(0).bytes(nbytes))
    walls, cpus = [], []
    try:
        reply = a.makefile("rb")
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            a.sendall(f"{nbytes} {count}\n".encode())
            for _ in range(count):
                a.sendall(src)
            reply.readline()
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        a.sendall(b"0 0\n")
    finally:
        a.close()
        proc.wait(10)
    moved = count * nbytes
    return {"pipe_s_per_byte": statistics.median(walls) / moved, "pipe_cpu_per_byte": statistics.median(cpus) / moved}


def _cache_dir(where: str) -> Path:
    return Path(where or os.environ.get("LIFL_SIM_CACHE") or Path.home() / ".cache" / "lifl" / "sim")


def _key(*parts) -> str:
    text = json.dumps([_VERSION, os.cpu_count(), sys.version.split()[0], *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def costs_for(specs, processes: int, threads: int, cache: str = "", pushes: int = 400, model: str = "",
              check: bool = False) -> tuple[Costs, dict]:
    """Measured costs for this model (``model``: its name, else a dense model of its size) and client
    pool (``check``: clients keep reference sums); returns (costs, where each came from)."""
    d = _cache_dir(cache)
    d.mkdir(parents=True, exist_ok=True)
    src = {}
    numel = sum(int(np.prod(s, dtype=np.int64)) for _, s, _ in specs)
    f_path = d / f"fold-{_key('fold', [[n, list(s), t] for n, s, t in specs])}.json"
    nbytes = Layout.from_specs(TensorSpec(n, t, tuple(sh)) for n, sh, t in specs).total_size
    model = model or f"dense:{max(1, nbytes // 4)}"
    m_path = d / f"machine-{_key('machine', model, nbytes, processes, threads, pushes, check)}.json"
    if f_path.exists():
        fold_c = json.loads(f_path.read_text())
        src["fold"] = f"cache {f_path}"
    else:
        log.info("measuring fold costs for %d elements", numel)
        fold_c = measure_fold(specs)
        f_path.write_text(json.dumps(fold_c))
        src["fold"] = "measured now"
    if m_path.exists():
        mach = json.loads(m_path.read_text())
        src["ingest"] = src["cold_start"] = src["pipe"] = f"cache {m_path}"
    else:
        log.info("measuring cold start, pipe and ingest (real runs of %d-byte updates)", nbytes)
        tail = fold_c["update_s"] + fold_c["finalize_s"]
        mach = {**measure_ingest(model, nbytes, processes, threads, pushes, tail, check),
                **measure_pipe(nbytes), **measure_function()}
        m_path.write_text(json.dumps(mach))
        src["ingest"] = src["cold_start"] = src["pipe"] = "measured now"
    costs = Costs(mach["push_overhead_s"], mach["ingest_Bps"], fold_c["update_s"], fold_c["fuse_speedup"],
                  fold_c["partial_s"], fold_c["finalize_s"], mach["cold_start_s"], fold_c["flower_per_update_s"],
                  mach["gateway_cpu_push_s"], mach["gateway_cpu_per_byte"], mach["round_overhead_s"],
                  mach["command_s"], mach["pipe_s_per_byte"], mach["pipe_cpu_per_byte"])
    return costs, {"costs": asdict(costs), "source": src, "ingest_points": mach.get("ingest_points")}
