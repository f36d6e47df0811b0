"""Prometheus metrics (names prefixed ``lifl_``) on a per-server registry.

A registry per server keeps several servers in one process (tests, benchmarks)
apart; ``serve_http`` exposes it at ``/metrics``.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

# a gauge of a gateway pool's child: summed over the children alive (``lifl.gateway_pool``)
LIVE = "livesum"
_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.updates_received = Counter("lifl_updates_received", "Updates accepted", ["job"], registry=r)
        self.updates_rejected = Counter("lifl_updates_rejected", "Updates refused, by gRPC status",
                                        ["reason"], registry=r)
        self.updates_duplicate = Counter("lifl_updates_duplicate", "Identical repeats of an accepted update "
                                         "(a retry whose reply was lost: answered as duplicates, not folded)",
                                         ["job"], registry=r)
        self.bytes_ingested = Counter("lifl_bytes_ingested", "Update bytes written into shared memory", registry=r)
        self.fold_seconds = Histogram("lifl_fold_seconds", "Time of one fold command in a function",
                                      ["level"], buckets=_LAT, registry=r)
        self.post_arrival = Histogram("lifl_post_arrival_seconds",
                                      "Last accepted update -> global model pullable", buckets=_LAT, registry=r)
        self.round_duration = Histogram("lifl_round_duration_seconds", "Round open -> result",
                                        buckets=_LAT, registry=r)
        self.rounds = Counter("lifl_rounds", "Rounds closed, by outcome", ["outcome"], registry=r)
        self.aggregators_active = Gauge("lifl_aggregators_active", "Aggregator functions running, by level and node",
                                        ["level", "node"], registry=r, multiprocess_mode=LIVE)
        self.cold_starts = Counter("lifl_cold_starts", "Aggregator functions started from nothing", registry=r)
        self.warm_reuses = Counter("lifl_warm_reuses", "Dispatches to an already running function", registry=r)
        self.function_failures = Counter("lifl_function_failures", "Aggregator functions that died", registry=r)
        self.tasks_retried = Counter("lifl_tasks_retried", "Commands re-run after their function died", registry=r)
        self.cold_start_seconds = Histogram("lifl_cold_start_seconds", "Start of a new function until it is ready",
                                            buckets=_LAT, registry=r)
        self.dispatches = Counter("lifl_dispatches", "Update folds sent right at arrival, by cold/warm function",
                                  ["start"], registry=r)
        self.dispatch_seconds = Histogram("lifl_dispatch_seconds", "Update accepted -> fold command sent",
                                          ["start"], buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03,
                                                              0.05, 0.1, 0.3, 1), registry=r)
        self.replans = Counter("lifl_replans", "Round plans changed mid-round for a new arrival rate", registry=r)
        self.scale_downs = Counter("lifl_scale_downs", "Idle functions stopped after the keep-alive", registry=r)
        self.pipe_bytes = Counter("lifl_pipe_bytes", "Update bytes sent to functions over their socket "
                                  "(the update_transport = pipe ablation; 0 with shared memory)", registry=r)
        self.nodes_joined = Counter("lifl_nodes_joined", "Nodes adopted after start (an autoscaler added them)",
                                    registry=r)
        self.nodes_left = Counter("lifl_nodes_left", "Nodes that went away holding no work (e.g. scaled down "
                                  "when idle)", registry=r)
        self.nodes_lost = Counter("lifl_nodes_lost", "Nodes lost (with their gateway and shared memory)", registry=r)
        self.updates_lost = Counter("lifl_updates_lost", "Accepted updates lost with a node (taken back from "
                                    "their round)", registry=r)
        self.cross_node_bytes = Counter("lifl_cross_node_bytes", "Bytes moved between nodes, by what they were",
                                        ["kind"], registry=r)
        self.queue_depth = Gauge("lifl_queue_depth", "Updates received but not yet folded", registry=r,
                                 multiprocess_mode=LIVE)
        self.slots_in_use = Gauge("lifl_shm_slots_in_use", "Update slots holding an update", registry=r,
                                  multiprocess_mode=LIVE)
        self.shm_bytes = Gauge("lifl_shm_bytes", "Shared memory held, by kind", ["kind"], registry=r,
                               multiprocess_mode=LIVE)
        self.auth_refused = Counter("lifl_auth_refused", "Calls refused by authentication, authorization or the "
                                    "rate limit, by reason", ["reason"], registry=r)
        self.updates_screened = Counter("lifl_updates_screened", "Updates over screen_l2_max, by action taken "
                                        "(clipped, rejected)", ["action"], registry=r)
        # asynchronous (FedBuff) jobs
        self.staleness = Histogram("lifl_async_staleness", "Staleness of accepted asynchronous updates (versions)",
                                   ["job"], buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.buffer_fill = Gauge("lifl_async_buffer_fill", "Updates accepted into the open buffer", ["job"],
                                 registry=r, multiprocess_mode=LIVE)
        self.versions_published = Counter("lifl_async_versions_published", "Model versions published", ["job"],
                                          registry=r)
        self.refused_stale = Counter("lifl_async_refused_stale", "Asynchronous updates refused as too stale",
                                     ["job"], registry=r)
        self._http = None
        # other processes' metrics in the text format (the gateway pool's children): /metrics
        # shows their sums with this registry's
        self.sources: list[Callable[[], Iterable[bytes]]] = []

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start /metrics on ``port`` (0 picks one); return the bound port. A bind error names the
        address (a second server on one machine needs its own ``metrics_port``, or -1 for none)."""
        try:
            exposed = CollectorRegistry(auto_describe=False)
            exposed.register(_Merged(self))
            server, _thread = start_http_server(port, addr=addr, registry=exposed)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve /metrics on {addr}:{port}: {e.strerror}; "
                                   "set metrics_port (--metrics-port) to a free port, 0 for any, -1 for none") from None
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Merged:
    """A collector: this process's metrics plus every source's, samples with the same name and
    labels summed (counters, histogram buckets, gauges of per-process quantities). A source's
    ``_created`` samples are dropped: a creation time does not add up."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        sums = FamilySums()
        sums.add(self.metrics.registry.collect(), created=True)
        for source in self.metrics.sources:
            sums.add_texts(source())
        yield from sums.collect()


class FamilySums:
    """Metric families summed sample by sample (same name and labels), as one collector; only
    the family types in ``kinds`` (None: all)."""

    def __init__(self, kinds: tuple[str, ...] | None = None):
        self.kinds = kinds
        self._families: dict[str, tuple[str, str, str]] = {}        # name -> (documentation, type, unit)
        self._sums: dict[str, dict[tuple, float]] = {}              # name -> (sample, labels) -> value

    def add(self, families, created: bool = False) -> None:
        """``created``: keep ``_created`` samples (one registry's own; summed, they mean nothing)."""
        for fam in families:
            if self.kinds is not None and fam.type not in self.kinds:
                continue
            self._families.setdefault(fam.name, (fam.documentation, fam.type, fam.unit))
            sums = self._sums.setdefault(fam.name, {})
            for smp in fam.samples:
                if not created and smp.name.endswith("_created"):
                    continue
                key = (smp.name, tuple(sorted(smp.labels.items())))
                sums[key] = sums.get(key, 0.0) + smp.value

    def add_texts(self, texts) -> None:
        """Add metrics in the text format (a source's, a node's last scrape)."""
        for text in texts:
            self.add(text_string_to_metric_families(text.decode()))

    def text(self) -> bytes:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(self)
        return generate_latest(reg)

    def collect(self):
        for name, (doc, kind, unit) in self._families.items():
            fam = Metric(name, doc, kind, unit)
            for (sname, labels), value in self._sums[name].items():
                fam.add_sample(sname, dict(labels), value)
            yield fam


class RetiredCounts(FamilySums):
    """The counters and histograms of processes (or nodes) that are gone, summed, so that a sum
    over the live ones plus these never goes back (Prometheus would read a drop as a reset).
    Gauges are not kept: they describe what is gone."""

    def __init__(self):
        super().__init__(kinds=("counter", "histogram"))
