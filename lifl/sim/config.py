"""A simulation's settings: typed, validated, from a TOML file plus overrides.

``sim.toml`` has the tables ``[workload]``, ``[trace]``, ``[run]`` and
``[server]`` (the last passes through to :class:`lifl.config.ServerConfig`).
Every bad value is refused with a message naming the setting, before anything
starts.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

TRACE_KINDS = ("all_at_once", "uniform", "bursty", "diurnal", "straggler", "file", "fedscale")
MODES = ("virtual", "real", "both")
AGGREGATIONS = ("sync", "fedbuff")
#: What each variant means (docs/sim.md). Every ablation is a documented engine setting (README
#: settings table), so real mode runs the engine as a user would configure it and virtual mode
#: models the same mechanism with costs measured on the machine (lifl/sim/calibrate.py).
VARIANTS = {
    "lifl": "LIFL as configured (elastic planner, scale to zero)",
    "flat": "one aggregator: static planner with leaves=1",
    "always_on": "functions kept running: min_workers=workers, keep_alive_s=1e9",
    "no_keep_alive": "idle functions stopped at the next tick: keep_alive_s=0 (rounds cold-start again)",
    "lazy": "fold only once the round closes (collect, then aggregate in functions): fold_when=lazy",
    "no_reuse": "a function serves one role of one round, then stops (every role a cold start): "
                "reuse_functions=false, min_workers=0",
    "no_shm": "updates serialised to the functions over their socket, not read in place: update_transport=pipe",
    "serverful": "collect every update, then Flower's FedAvg aggregate() in one process",
}


class SimConfigError(ValueError):
    """A simulation setting is missing, out of range or inconsistent."""


@dataclass(frozen=True)
class Workload:
    rounds: int = 1
    clients_per_round: int = 100
    population: int = 0               # clients that exist (0: clients_per_round); dormant ones cost a row
    model: str = "mlp100k"            # zoo name, "mlp100k", "dense:N" or a path to an .npz
    dropout: float = 0.0              # share of selected clients that never report
    examples_min: int = 10            # each client's num_examples ~ U[min, max] (FedAvg weight)
    examples_max: int = 500
    seed: int = 0

    @property
    def clients(self) -> int:
        return self.population or self.clients_per_round


@dataclass(frozen=True)
class TraceSpec:
    kind: str = "all_at_once"
    window_s: float = 10.0            # uniform/bursty/straggler: arrivals spread over this
    bursts: int = 4                   # bursty: number of bursts inside the window
    burst_width_s: float = 0.2        # bursty: spread of one burst (exponential)
    period_s: float = 86400.0         # diurnal: length of a day
    active_fraction: float = 0.5      # diurnal: share of the day a client is available
    compute_median_s: float = 0.0     # local training time ~ lognormal(median, sigma); 0 = none
    compute_sigma: float = 0.0
    upload_median_mbps: float = 0.0   # uplink ~ lognormal(median, sigma), megabit/s; 0 = unlimited
    upload_sigma: float = 0.0
    path: str = ""                    # file: our JSONL/CSV; fedscale: client_behave_trace pickle
    capacity_path: str = ""           # fedscale: client_device_capacity pickle (optional)
    fedscale_batch_size: int = 30     # fedscale completion time: 3 x batch x steps x ms/sample
    fedscale_local_steps: int = 20


@dataclass(frozen=True)
class RunSpec:
    mode: str = "virtual"
    variants: tuple[str, ...] = ("lifl",)
    sizes: tuple[int, ...] = ()       # a sweep: clients_per_round values (default: the workload's)
    processes: int = 2                # real mode: client processes
    threads: int = 4                  # real mode: pushes in flight per client process
    training: bool = False            # clients train a model (run.task); accuracy per round
    task: str = "lifl.sim.training"   # training mode: module with SPECS, initial_model, local_train, accuracy
    learning_rate: float = 0.05
    local_epochs: int = 1
    aggregation: str = "sync"         # training mode: "sync" rounds, or "fedbuff" (asynchronous, docs/sim.md)
    concurrency: int = 0              # fedbuff: clients training at once, both methods (0: clients_per_round)
    buffer_size: int = 10             # fedbuff: K, accepted updates per published version
    server_lr: float = 1.0            # fedbuff: its server learning rate (server SGD)
    staleness: str = "polynomial"     # fedbuff: constant | polynomial (normalised to the mean staleness)
    staleness_exponent: float = 0.5
    max_staleness: int = 0            # fedbuff: refuse updates staler than this (0: none)
    horizon_s: float = 60.0           # fedbuff: virtual seconds FedBuff and its synchronous baseline run
    sync_server_lr: float = 1.0       # fedbuff: the synchronous baseline's server step (1 = FedAvg)
    over_selection: float = 0.0       # fedbuff: the synchronous baseline picks C·(1+this), keeps the first C
    check_exact: bool = True          # real mode: compare each result with float64 FedAvg
    tick_s: float = 0.05              # virtual mode: the dispatcher's tick while a round is open
    nodes: int = 1                    # virtual mode: machines (each with a gateway)
    cores_per_node: float = 0.0       # virtual mode: fold cores per node (0: this machine's, minus one)
    calibration_cache: str = ""       # where measured costs are cached ("" = ~/.cache/lifl/sim)
    calibration_pushes: int = 400     # real pushes of the ingest calibration (small updates; large: 1/8)
    out: str = "sim-out"
    progress: bool = True


@dataclass(frozen=True)
class SimConfig:
    workload: Workload = field(default_factory=Workload)
    trace: TraceSpec = field(default_factory=TraceSpec)
    run: RunSpec = field(default_factory=RunSpec)
    server: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> "SimConfig":
        w, t, r = self.workload, self.trace, self.run
        _check(w.rounds >= 1, "workload.rounds must be >= 1, got %r" % w.rounds)
        _check(1 <= w.clients_per_round <= 1_000_000,
               "workload.clients_per_round must be between 1 and 1,000,000, got %r" % w.clients_per_round)
        _check(w.population >= 0, "workload.population must be >= 0, got %r" % w.population)
        _check(w.population == 0 or w.population >= w.clients_per_round,
               f"workload.population ({w.population}) is smaller than clients_per_round ({w.clients_per_round})")
        _check(0.0 <= w.dropout < 1.0, "workload.dropout must be in [0, 1), got %r" % w.dropout)
        _check(1 <= w.examples_min <= w.examples_max,
               f"workload.examples_min/max must satisfy 1 <= min <= max, got {w.examples_min}/{w.examples_max}")
        _check(t.kind in TRACE_KINDS, f"unknown trace kind {t.kind!r}; known: {', '.join(TRACE_KINDS)}")
        for name in ("window_s", "burst_width_s", "compute_median_s", "compute_sigma", "upload_median_mbps",
                     "upload_sigma"):
            v = getattr(t, name)
            _check(math.isfinite(v) and v >= 0, f"trace.{name} must be a finite number >= 0, got {v!r}")
        _check(t.bursts >= 1, "trace.bursts must be >= 1, got %r" % t.bursts)
        _check(t.period_s > 0, "trace.period_s must be > 0, got %r" % t.period_s)
        _check(0 < t.active_fraction <= 1, "trace.active_fraction must be in (0, 1], got %r" % t.active_fraction)
        _check(t.kind not in ("file", "fedscale") or bool(t.path), f"trace kind {t.kind!r} needs trace.path")
        _check(t.fedscale_batch_size >= 1 and t.fedscale_local_steps >= 1,
               "trace.fedscale_batch_size and fedscale_local_steps must be >= 1")
        _check(r.mode in MODES, f"run.mode must be one of {', '.join(MODES)}, got {r.mode!r}")
        _check(bool(r.variants), "run.variants must name at least one variant")
        bad = [v for v in r.variants if v not in VARIANTS]
        _check(not bad, f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
        _check(all(isinstance(n, int) and 1 <= n <= 1_000_000 for n in r.sizes),
               f"run.sizes must be client counts between 1 and 1,000,000, got {list(r.sizes)}")
        _check(r.calibration_pushes >= 8, "run.calibration_pushes must be >= 8")
        _check(r.processes >= 1 and r.threads >= 1, "run.processes and run.threads must be >= 1")
        _check(r.local_epochs >= 1 and r.learning_rate > 0, "run.local_epochs >= 1 and run.learning_rate > 0")
        _check(r.tick_s > 0 and r.nodes >= 1 and r.cores_per_node >= 0,
               "run.tick_s > 0, run.nodes >= 1 and run.cores_per_node >= 0 are required")
        if r.training:
            from .training import load_task
            load_task(r.task)
        _check(r.aggregation in AGGREGATIONS, f"run.aggregation must be one of {', '.join(AGGREGATIONS)}, "
                                               f"got {r.aggregation!r}")
        if r.aggregation == "fedbuff":
            conc = r.concurrency or w.clients_per_round
            _check(r.training, "run.aggregation = \"fedbuff\" needs run.training = true (it measures accuracy)")
            _check(r.buffer_size >= 1 and r.concurrency >= 0, "run.buffer_size >= 1 and run.concurrency >= 0")
            _check(w.clients >= conc + r.buffer_size,
                   f"fedbuff: the population ({w.clients}) must be at least concurrency ({conc}) + "
                   f"run.buffer_size ({r.buffer_size}): a client cannot push twice into one buffer")
            _check(r.staleness in ("constant", "polynomial") and 0 <= r.staleness_exponent <= 1,
                   "run.staleness must be constant or polynomial, run.staleness_exponent in [0, 1]")
            _check(r.max_staleness >= 0 and r.over_selection >= 0, "run.max_staleness and run.over_selection >= 0")
            _check(math.isfinite(r.horizon_s) and r.horizon_s > 0, "run.horizon_s must be > 0")
            _check(r.server_lr > 0 and r.sync_server_lr > 0, "run.server_lr and run.sync_server_lr must be > 0")
        from ..config import ServerConfig  # the server table is checked by the server's own rules
        known = {f.name for f in fields(ServerConfig)}
        unknown = sorted(set(self.server) - known)
        _check(not unknown, f"[server]: unknown setting(s) {', '.join(unknown)}")
        try:
            ServerConfig(**dict(self.server)).validate()
        except (TypeError, ValueError) as e:
            raise SimConfigError(f"[server]: {e}") from None
        for v in r.variants:   # each variant's engine settings on top of the table
            try:
                ServerConfig(**server_settings(self, v)).validate()
            except ValueError as e:
                raise SimConfigError(f"variant {v!r} with this [server] table: {e}") from None
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run"]["variants"] = list(self.run.variants)
        d["run"]["sizes"] = list(self.run.sizes)
        d["server"] = dict(self.server)
        return d


def server_settings(cfg: SimConfig, variant: str) -> dict:
    """The ``[server]`` table with a variant's documented engine settings applied."""
    s = dict(cfg.server)
    if variant == "flat":
        s.update(planner="static", leaves=1)
    elif variant == "always_on":
        from ..config import ServerConfig
        s["min_workers"] = s.get("workers", ServerConfig().workers)
        s["keep_alive_s"] = 1e9
    elif variant == "no_keep_alive":
        s.update(keep_alive_s=0.0, min_workers=0)
    elif variant == "lazy":
        s["fold_when"] = "lazy"
    elif variant == "no_reuse":
        s.update(reuse_functions=False, min_workers=0)
    elif variant == "no_shm":
        s["update_transport"] = "pipe"
    return s


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise SimConfigError(msg)


def _table(cls, data: Mapping[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    _check(not unknown, f"[{where}]: unknown setting(s) {', '.join(unknown)}")
    out = {}
    for k, v in data.items():
        default = getattr(cls(), k)
        if isinstance(default, tuple):
            v = tuple(v.split(",")) if isinstance(v, str) else tuple(v)
            if k == "sizes":
                try:
                    v = tuple(int(x) for x in v)
                except (TypeError, ValueError):
                    raise SimConfigError(f"{where}.sizes must be integers, got {list(v)}") from None
        elif isinstance(default, bool):
            _check(isinstance(v, bool), f"{where}.{k} must be true or false, got {v!r}")
        elif isinstance(default, float):
            _check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{where}.{k} must be a number, got {v!r}")
            v = float(v)
        elif isinstance(default, int):
            _check(isinstance(v, int) and not isinstance(v, bool), f"{where}.{k} must be an integer, got {v!r}")
        elif isinstance(default, str):
            _check(isinstance(v, str), f"{where}.{k} must be a string, got {v!r}")
        out[k] = v
    return cls(**out)


def from_dict(data: Mapping[str, Any]) -> SimConfig:
    unknown = sorted(set(data) - {"workload", "trace", "run", "server"})
    _check(not unknown, f"unknown table(s) {', '.join(unknown)}; expected workload, trace, run, server")
    return SimConfig(_table(Workload, data.get("workload", {}), "workload"),
                     _table(TraceSpec, data.get("trace", {}), "trace"),
                     _table(RunSpec, data.get("run", {}), "run"),
                     dict(data.get("server", {}))).validate()


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> SimConfig:
    """Read ``path`` (TOML) and apply ``overrides`` given as ``{"table.key": value}`` (None values skipped)."""
    data: dict[str, dict] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SimConfigError(f"cannot read {path}: {e}") from None
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, v in (overrides or {}).items():
        if v is None:
            continue
        table, _, name = key.partition(".")
        _check(bool(name), f"override {key!r} must be table.key")
        data.setdefault(table, {})[name] = v
    return from_dict(data)


def with_server(cfg: SimConfig, **server: Any) -> SimConfig:
    return replace(cfg, server={**cfg.server, **server})
