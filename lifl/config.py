"""Server configuration: defaults < TOML file < ``LIFL_*`` environment < command-line flags."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

MiB = 2**20


def _default_leaves() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                 # 0 picks a free port
    metrics_port: int = 9464          # 0 picks a free port, -1 disables /metrics
    runtime: str = "local"            # "local" (processes on this machine) or "ray" (actors on a Ray cluster)
    ray_address: str = ""             # ray runtime: an existing cluster ("auto", "host:6379"); empty starts one
    placement: str = "locality"       # ray runtime: "locality" (control.placement) or "random" (a baseline)
    function_cpus: float = 1.0        # ray runtime: CPUs one aggregator function reserves
    node_gateway_port: int = 0        # ray runtime: port of each node's gateway (0 picks a free one)
    # data plane
    shm_budget_mb: int = 1024         # update slots in flight (received, not yet folded)
    shm_prefix: str = "lifl"
    admission_timeout_s: float = 30.0  # how long a push waits for a slot before RESOURCE_EXHAUSTED
    reject_nonfinite: bool = True
    max_chunk_bytes: int = 8 * MiB
    header_limit_bytes: int = 1 * MiB
    keep_rounds: int = 8              # results kept for Pull
    release_idle_shm: bool = True     # no round running: unlink cached update slots and accumulators
    grpc_threads: int = 32
    gateway_processes: str = "auto"   # processes serving the gRPC port (SO_REUSEPORT); "auto": 1 up to 4 cores
    switch_interval_ms: float = 0.5   # the interpreter's GIL switch interval while serving (0: leave it); restored on stop
    max_model_mb: int = 1024          # largest model a round may have (also capped by shm_budget_mb)
    max_concurrent_rpcs: int = 256    # calls in progress at once (more get RESOURCE_EXHAUSTED): bounds calls and threads
    fault_fold_delay_s: float = 0.0   # fault injection for tests: functions pause this long after a fold, before replying
    log_level: str = "info"           # lifl serve's log level: debug, info, warning, error
    grpc_bdp_probe: bool = True       # gRPC grows stream windows by probing bandwidth: off saves memory (server.py)
    malloc_keep_buffers: bool = True  # lifl serve and pool processes keep freed chunk buffers (malloc_policy)
    pull_buffer_mb: int = 8           # model bytes all Pull streams together may have in gRPC's send buffers
    # hierarchy (static planner)
    # default: one leaf per two cores (the gateway needs cores too); 1 leaf on a 2-core machine
    workers: int = field(default_factory=lambda: _default_leaves())  # most functions running at once
    min_workers: int = 0              # functions kept warm when idle (0 = scale to zero)
    keep_alive_s: float = 30.0        # an idle function lives this long before it is stopped
    spawn: str = "zygote"             # "zygote" (fork server, ms cold starts) or "exec" (fresh interpreter)
    leaves: int = field(default_factory=lambda: _default_leaves())
    fan_in: int = 4
    fold_cores: int = 0               # cores the planner may fill with leaves (0: all but one)
    planner: str = "elastic"          # "elastic": leaves/fan-in from measured costs (leaves is the cap); "static"
    # ablations (lifl sim variants): each turns off one of LIFL's design choices
    fold_when: str = "eager"          # "eager": fold updates as they arrive; "lazy": only once the round closes
    reuse_functions: bool = True      # false: a function serves one role of one round, then stops (all cold starts)
    update_transport: str = "shm"     # "shm": functions read slots in place; "pipe": bytes sent over their socket
    # security
    tokens: list[str] = field(default_factory=list)  # client bearer tokens; empty = no auth
    admin_token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # trust (docs/security.md)
    tls_client_ca: str = ""           # PEM CA: require client certificates it signed (mutual TLS); identity = CN
    tls_operators: list[str] = field(default_factory=list)  # certificate identities that may open/close rounds
    insecure: bool = False            # allow plaintext on a non-loopback host (logged as a warning)
    token_key: str = ""               # Ed25519 public key (PEM) verifying signed credentials (lifl token)
    token_revoked: str = ""           # file of revoked token ids (jti), one a line; re-read when it changes
    rate_limit_per_s: float = 0.0     # calls per second per client identity (0: no limit)
    rate_limit_burst: int = 20        # calls a client may make in a row before rate_limit_per_s applies
    keepalive_time_s: float = 7200.0  # the server pings an idle connection after this long
    keepalive_timeout_s: float = 20.0  # ... and closes it when the ping is not answered in this long
    keepalive_min_ping_interval_s: float = 60.0  # clients pinging more often (without data) get strikes
    keepalive_max_ping_strikes: int = 2  # strikes before the server closes the connection (GOAWAY too_many_pings)
    keepalive_permit_without_calls: bool = False  # accept client pings on connections with no call
    max_connection_idle_s: float = 0.0  # close connections idle this long (0: never)
    max_connection_age_s: float = 0.0   # close connections this old, after a grace (0: never)
    max_connection_age_grace_s: float = 30.0  # calls still running get this long after max_connection_age_s
    screen_l2_max: float = 0.0        # L2-norm bound on an update's float tensors (0: no screening)
    screen_mode: str = "reject"       # over the bound: "reject" (INVALID_ARGUMENT) or "clip" (scale to the bound)
    # durability (docs/durability.md)
    durable_dir: str = ""             # a directory: acknowledged updates and round transitions are fsynced there first

    def validate(self) -> "ServerConfig":
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.shm_budget_mb < 1:
            raise ValueError("shm_budget_mb must be >= 1")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.max_model_mb < 1:
            raise ValueError("max_model_mb must be >= 1")
        if self.max_concurrent_rpcs < 1:
            raise ValueError("max_concurrent_rpcs must be >= 1")
        if self.pull_buffer_mb < 1:
            raise ValueError("pull_buffer_mb must be >= 1")
        self.gateway_count()
        if self.leaves < 1 or self.workers < 1:
            raise ValueError("leaves and workers must be >= 1")
        if not 0 <= self.min_workers <= self.workers:
            raise ValueError("min_workers must be between 0 and workers")
        if self.keep_alive_s < 0:
            raise ValueError("keep_alive_s must be >= 0")
        if self.planner not in ("elastic", "static"):
            raise ValueError(f"planner must be 'elastic' or 'static', got {self.planner!r}")
        if self.spawn not in ("zygote", "exec"):
            raise ValueError(f"spawn must be 'zygote' or 'exec', got {self.spawn!r}")
        if self.fold_when not in ("eager", "lazy"):
            raise ValueError(f"fold_when must be 'eager' or 'lazy', got {self.fold_when!r}")
        if self.update_transport not in ("shm", "pipe"):
            raise ValueError(f"update_transport must be 'shm' or 'pipe', got {self.update_transport!r}")
        if self.update_transport == "pipe" and self.runtime != "local":
            raise ValueError("update_transport = 'pipe' is an ablation of the local runtime only")
        if self.leaves > 1 and self.fan_in < 2:
            raise ValueError("fan_in must be >= 2 when there is more than one leaf")
        if self.runtime not in ("local", "ray"):
            raise ValueError(f"unknown runtime {self.runtime!r}; available: local, ray")
        if self.placement not in ("locality", "random"):
            raise ValueError(f"placement must be 'locality' or 'random', got {self.placement!r}")
        if self.function_cpus <= 0:
            raise ValueError("function_cpus must be > 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.durable_dir and self.runtime != "local":
            raise ValueError("durable_dir (durable mode) needs the local runtime; the Ray runtime is not durable")
        self._validate_trust()
        return self

    def _validate_trust(self) -> None:
        from .transport import plaintext_refusal
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.tls_operators and not self.tls_client_ca:
            raise ValueError("tls_operators names client-certificate identities: it needs tls_client_ca")
        if self.token_revoked and not self.token_key:
            raise ValueError("token_revoked lists signed credentials: it needs token_key")
        why = plaintext_refusal(self.host, bool(self.tls_cert), self.insecure)
        if why:
            raise ValueError(why)
        if self.rate_limit_per_s < 0 or self.rate_limit_burst < 1:
            raise ValueError("rate_limit_per_s must be >= 0 and rate_limit_burst >= 1")
        if min(self.keepalive_time_s, self.keepalive_timeout_s, self.keepalive_min_ping_interval_s) <= 0:
            raise ValueError("keepalive_time_s, keepalive_timeout_s and keepalive_min_ping_interval_s must be > 0")
        if self.keepalive_max_ping_strikes < 0:
            raise ValueError("keepalive_max_ping_strikes must be >= 0")
        if min(self.max_connection_idle_s, self.max_connection_age_s, self.max_connection_age_grace_s) < 0:
            raise ValueError("max_connection_idle_s, max_connection_age_s and max_connection_age_grace_s must be >= 0")
        if not self.screen_l2_max >= 0:
            raise ValueError("screen_l2_max must be >= 0 (0: no screening)")
        if self.screen_mode not in ("reject", "clip"):
            raise ValueError(f"screen_mode must be 'reject' or 'clip', got {self.screen_mode!r}")

    def gateway_count(self) -> int:
        """Gateway processes to run: ``gateway_processes`` as a number, or for ``auto`` 1 on up to 4
        cores (one process already fills a small machine) and half the cores, at most 8, above."""
        v = str(self.gateway_processes).strip().lower()
        if v == "auto":
            cores = os.cpu_count() or 1
            return 1 if cores <= 4 else min(8, cores // 2)
        try:
            n = int(v)
        except ValueError:
            n = 0
        if not 1 <= n <= 256:
            raise ValueError(f"gateway_processes must be 'auto' or 1..256, got {self.gateway_processes!r}")
        return n

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t == "bool":
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{f.name}: expected a boolean, got {value!r}")
    if t == "int":
        return int(value)
    if t == "float":
        return float(value)
    if t.startswith("list"):
        return [v for v in value.split(",") if v]
    return value


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """Merge a TOML file (top-level keys or a ``[server]`` table), ``LIFL_<FIELD>`` env vars and overrides."""
    env = os.environ if env is None else env
    known = {f.name: f for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    if path:
        data = tomllib.loads(Path(path).read_text())
        data = data.get("server", data)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values.update(data)
    for name, f in known.items():
        key = "LIFL_" + name.upper()
        if key in env:
            values[name] = _coerce(f, env[key])
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    cfg = ServerConfig(**{k: _coerce(known[k], v) for k, v in values.items()})
    return cfg.validate()
