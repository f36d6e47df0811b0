"""One gateway process of the pool (``lifl.gateway_pool``), started by the head.

It reads one JSON line on stdin (the server's settings, the head's Unix socket,
the pool's secret, its name), listens on the shared port (SO_REUSEPORT) and on
a private loopback port, prints ``READY host:port`` (the private one) and
serves until stdin closes (the head closes it to stop us, and the kernel when the head dies). Pushes are the node gateway's (``node_gateway``):
the head decides, this process writes the bytes — into slots of the head's
arena (:class:`RemoteSlots`), which it attaches and never creates or unlinks.
"""
from __future__ import annotations

import collections
import json
import logging
import sys
import threading
from dataclasses import dataclass

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from . import malloc_policy
from .auth import current_rate_key
from .config import ServerConfig
from .head_link import HeadLink
from .metrics import Metrics
from .node_gateway import NodeGateway, gateway_server
from .pool_channel import FrameLink
from .shm import Segment

log = logging.getLogger("lifl.pool_gateway")


@dataclass
class _Stats:
    slots_in_use: int = 0   # the head's arena reports the pool's slots; a child adds nothing


class RemoteSlots:
    """The arena as a pool process sees it: slots come from, and go back to, the head's budget.
    Mappings are cached by name (the head reuses free slots, and names are never reused), at
    most ``budget`` bytes of them: pages of a reused slot are already mapped and faulted in."""

    def __init__(self, link: HeadLink, budget: int):
        self.link, self.budget = link, budget
        self._maps: collections.OrderedDict[str, Segment] = collections.OrderedDict()
        self._held = 0   # bytes of the mappings in _maps
        self._lock = threading.Lock()

    def acquire_slot(self, size: int, timeout: float = 0.0) -> Segment:
        return self._map(self.link.call("slot", "", 0, size=size, timeout=timeout)["slot"])

    def admit(self, op: str, job: str, rid: int, client: str, size: int, timeout: float, **kw) -> Segment:
        """The parent's ``op`` — ``begin`` (a round's push: deduplication, the round's state) or
        ``async_check`` (an asynchronous delta's) — and the push's slot, in one call; a refusal
        takes no slot."""
        name = self.link.call(op, job, rid, client=client, size=size, timeout=timeout, **kw)["slot"]
        try:
            return self._map(name)
        except OSError:   # the slot went back already
            if op == "begin":
                self.link.call("abandon", job, rid, client=client)
            raise

    def _map(self, name: str) -> Segment:
        with self._lock:
            seg = self._maps.pop(name, None)
            if seg is not None:
                self._held -= seg.size
        if seg is None:
            try:
                seg = Segment.attach(name)
            except OSError:
                self.release_slot(name)
                raise
        with self._lock:
            self._maps[name] = seg
            self._held += seg.size
            while self._held > self.budget and len(self._maps) > 1:
                _, old = self._maps.popitem(last=False)
                self._held -= old.size
                old.close()
        return seg

    def release_slot(self, name: str) -> None:
        self.link.call("release", "", 0, slot=name)

    def stats(self) -> _Stats:
        return _Stats()

    def close(self) -> None:
        with self._lock:
            for seg in self._maps.values():
                seg.close()
            self._maps.clear()
            self._held = 0


class PoolGateway(NodeGateway):
    """A pool process's gateway: the call that admits a push brings its slot. A round's push makes
    two calls to the parent, ``begin`` and ``accept`` (the round's layout is asked once per
    round); an asynchronous delta three (``async_job``, ``async_check``, ``async_accept``)."""

    def _begin(self, h, enc) -> Segment:
        return self.arena.admit("begin", h.job, h.round, h.client_id, enc.slot_size, self.config.admission_timeout_s,
                                rate_key=current_rate_key())

    def _check_async(self, h, aj, enc) -> Segment:
        return self.arena.admit("async_check", aj.name, 0, h.client_id, enc.slot_size,
                                self.config.admission_timeout_s, base=h.base_version, rate_key=current_rate_key())


def serve(spec: dict) -> None:
    cfg = ServerConfig(**spec["config"])
    malloc_policy.apply(cfg)
    from .config import MiB
    from .transport import server_credentials
    timeout = cfg.admission_timeout_s + 30.0
    link = HeadLink(spec["head"], spec["secret"], spec["node"], timeout_s=timeout,
                    calls=FrameLink(spec["calls"], spec["secret"], timeout))
    metrics = Metrics()
    slots = RemoteSlots(link, cfg.shm_budget_mb * MiB)
    gateway = PoolGateway(cfg, slots, link, metrics)
    server = gateway_server(cfg, gateway.handlers(), [gateway.auth()], reuseport=True)
    creds = server_credentials(cfg)
    target = f"{cfg.host}:{cfg.port}"
    port = server.add_secure_port(target, creds) if creds is not None else server.add_insecure_port(target)
    private = server.add_insecure_port("127.0.0.1:0")
    if port != cfg.port or not private:
        raise OSError(f"gateway process {spec['node']}: cannot listen on {target} (SO_REUSEPORT)")
    health = HealthServicer(experimental_non_blocking=True)   # probes reach the pool, not the head
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.start()
    for service in ("", "lifl.v1.Aggregation", "lifl.v1.Admin"):
        health.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"READY 127.0.0.1:{private}", flush=True)
    sys.stdin.read()   # the head closes our stdin to stop us
    health.enter_graceful_shutdown()
    server.stop(1.0).wait()
    gateway.close()
    link.close()
    slots.close()


def main() -> None:
    # no PR_SET_PDEATHSIG: it fires when the *thread* that started us ends (the head starts and
    # replaces children from short-lived threads). The head's end closes our stdin instead.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the head stops us (Ctrl-C reaches the whole group)
    spec = json.loads(sys.stdin.readline())
    logging.getLogger().setLevel(spec["config"].get("log_level", "info").upper())
    serve(spec)


if __name__ == "__main__":
    main()
