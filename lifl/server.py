"""The embedded LIFL server: arena + runtime + dispatcher + gateway + /metrics, as one context manager."""
from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .config import MiB, ServerConfig
from .dispatcher import Dispatcher
from .durable import NO_JOURNAL
from .gateway import Gateway
from .gateway_pool import GatewayPool, reserve_port
from .head_link import HeadService
from .node_gateway import gateway_server
from .metrics import Metrics
from .runtime.local import LocalRuntime
from .shm import Arena
from .transport import listen, server_credentials

log = logging.getLogger("lifl.server")


def _make_runtime(config: ServerConfig, arena: Arena, metrics: Metrics):
    if config.runtime == "local":
        return LocalRuntime(arena, spawn=config.spawn, workers=config.workers, fold_cores=config.fold_cores)
    if config.runtime == "ray":
        from .runtime.ray import RayRuntime
        return RayRuntime(config, arena, metrics)
    raise ValueError(f"unknown runtime {config.runtime!r}")


#: Names the health service reports on: "" (the whole server) and each LIFL service.
HEALTH_SERVICES = ("", "lifl.v1.Aggregation", "lifl.v1.Admin")


class EmbeddedServer:
    """Start with ``with EmbeddedServer(ServerConfig(port=0)) as srv: ...``; ``srv.address`` is host:port."""

    def __init__(self, config: ServerConfig | None = None, runtime=None, clock=None):
        """``runtime``: a factory ``(config, arena, metrics) -> Runtime`` (:class:`lifl.runtime.base.Runtime`)
        to run functions on instead of the one ``config.runtime`` names; the server closes it.
        ``clock``: an :mod:`lifl.engine.clock` clock for deadlines and keep-alives; with one
        given there is no control-loop thread and the caller runs :meth:`tick` after moving time
        (tests and simulations that must not race the real clock)."""
        self._clock = clock
        self._switch_interval: float | None = None   # the interpreter's, to restore on stop
        self.config = (config or ServerConfig()).validate()
        self.metrics = Metrics()
        self.arena: Arena | None = None
        self._given_runtime = runtime
        self.runtime = None
        self.dispatcher: Dispatcher | None = None
        self._gateway: Gateway | None = None
        self.pool: GatewayPool | None = None
        self._reserved = None   # the pool's port, bound (not listening) while the pool serves it
        self.grpc: grpc.Server | None = None
        self.port = 0
        self.metrics_port = -1
        # grpc.health.v1 for load balancers and Kubernetes probes: SERVING while up,
        # NOT_SERVING from the first moment of stop() (before the gRPC server drains)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._stats_stop = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "EmbeddedServer":
        cfg = self.config
        # gRPC threads copying chunks hold the GIL in 5 ms slices by default; a descriptor
        # event waiting behind them would see that as dispatch latency (switch_interval_ms)
        if cfg.switch_interval_ms > 0 and self._switch_interval is None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch_interval, cfg.switch_interval_ms / 1000))
        try:
            self.arena = Arena(cfg.shm_budget_mb * MiB, prefix=cfg.shm_prefix)
            self.runtime = (self._given_runtime or _make_runtime)(cfg, self.arena, self.metrics)
            self.metrics.sources.append(self.runtime.metrics_texts)   # other nodes' gateways (Ray)
            journal, logged = NO_JOURNAL, {}
            if cfg.durable_dir:
                from .durable.recover import open_journal
                journal, logged = open_journal(Path(cfg.durable_dir))
            self.dispatcher = Dispatcher(cfg, self.arena, self.runtime, self.metrics, clock=self._clock,
                                         ticker=False, journal=journal)
            if logged:
                from .durable.recover import resume
                n = resume(self.dispatcher, journal, logged)
                log.info("durable mode: %d round(s) and %d update(s) recovered from %s", len(logged), n,
                         cfg.durable_dir)
            if self._clock is None:
                self.dispatcher.start_ticker()
            gateway = self._gateway = Gateway(cfg, self.arena, self.dispatcher, self.metrics, clock=self._clock)
            creds = server_credentials(cfg)   # before listening: a plaintext refusal or a bad file stops here
            handlers = gateway.handlers()
            ray, pooled = cfg.runtime == "ray", cfg.gateway_count() > 1
            head = None
            if ray or pooled:   # node gateways and pool processes call the dispatcher through this
                head = HeadService(self.dispatcher, secrets.token_hex(16), asyncs=gateway.asyncs,
                                   rate=gateway.admit_rate)
            if ray:
                handlers.append(head.handler())
                self.runtime.events.open_streams = head.forget_node
            relay = head.secret if ray else ""   # node gateways relay calls to this server
            self.grpc = gateway_server(cfg, handlers, [gateway.auth(relay_secret=relay)], reuseport=pooled)
            target = f"{cfg.host}:{cfg.port}"
            link_port = 0
            if pooled:   # the head only decides: the pool's processes take every client connection
                self._reserved = reserve_port(cfg.host, cfg.port)
                self.port = self._reserved.getsockname()[1]
                self.grpc.add_insecure_port("127.0.0.1:0")   # health and tests; clients use the pool
                if ray:   # other nodes' gateways reach the head on a port of its own (any free one)
                    link_port = listen(self.grpc, f"{cfg.host}:0", creds)
                    if not link_port:
                        raise OSError(f"cannot listen on {cfg.host}:0 for the node gateways")
            else:
                self.port = link_port = listen(self.grpc, target, creds)
            if not self.port:
                raise OSError(f"cannot listen on {target}")
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
            self.grpc.start()
            if ray:
                host = cfg.host if cfg.host not in ("0.0.0.0", "::") else _node_ip()  # nosec B104  # a test of the bind address
                self.runtime.start_gateways(f"{host}:{link_port}", head.secret)
            if pooled:   # the other gateway processes, on the same port (lifl.gateway_pool)
                self.pool = GatewayPool(cfg, gateway, head, self.port).start()
                self.metrics.sources.append(self.pool.metrics_texts)
            if cfg.metrics_port >= 0:
                self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.host)
            threading.Thread(target=self._sample_stats, name="lifl-stats", daemon=True).start()
            for service in HEALTH_SERVICES:
                self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            self.stop()
            raise
        return self

    def _sample_stats(self) -> None:
        while not self._stats_stop.wait(0.5):
            st = self.arena.stats()
            self.metrics.slots_in_use.set(st.slots_in_use)
            self.metrics.shm_bytes.labels("slots").set(st.slot_bytes_in_use + st.slot_bytes_cached)
            self.metrics.shm_bytes.labels("accumulators_and_results").set(st.other_bytes)
            self.metrics.aggregators_active.clear()
            for w in self.dispatcher.snapshot().functions:
                self.metrics.aggregators_active.labels(w.role, w.node).inc()

    def snapshot(self):
        """The engine now, read-only (:class:`lifl.engine.snapshot.EngineSnapshot`): functions and
        their roles, rounds and their leaves."""
        return self.dispatcher.snapshot()

    def tick(self) -> None:
        """Run one control-loop step now: deadlines, re-planning, autoscaling (see ``clock``)."""
        self.dispatcher.tick()

    def gateways(self) -> dict[str, str]:
        """Push addresses by node: this server's, plus each other node's gateway (ray runtime)."""
        return {self.runtime.head: self.address, **self.runtime.gateways()}

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving, fail open rounds, stop functions, unlink every segment. Each step runs
        even if an earlier one raised (that error is logged and re-raised at the end): shared
        memory is never left behind by a failed shutdown."""
        self._stats_stop.set()
        self.health.enter_graceful_shutdown()  # probes and load balancers see NOT_SERVING first
        errors = []
        steps = (("gRPC", lambda: self._stop_grpc(grace)), ("engine", self._stop_engine),
                 ("metrics", self.metrics.close), ("shared memory", self._close_arena),
                 ("switch interval", self._restore_switch_interval))
        for what, step in steps:
            try:
                step()
            except Exception as e:
                log.exception("shutdown: stopping the %s failed", what)
                errors.append(e)
        if errors:
            raise errors[0]

    def _stop_grpc(self, grace: float) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close(grace)
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self.grpc is not None:
            server, self.grpc = self.grpc, None
            server.stop(grace).wait()

    def _stop_engine(self) -> None:
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            gateway.close()
        dispatcher, runtime, self.dispatcher, self.runtime = self.dispatcher, self.runtime, None, None
        if dispatcher is not None:
            dispatcher.close()
        elif runtime is not None:
            runtime.close()

    def _restore_switch_interval(self) -> None:
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    def _close_arena(self) -> None:
        if self.arena is not None:
            arena, self.arena = self.arena, None
            arena.close()

    def wait(self) -> None:
        """Block until stop() is called from elsewhere (a signal handler)."""
        while self.grpc is not None:
            time.sleep(0.2)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()
