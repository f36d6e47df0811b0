"""What runs inside Ray (imported by Ray's worker processes): a node's agent and an aggregator function.

``NodeAgent`` (one per node, pinned there): owns the node's shared-memory
arena and runs the node's gateway, so client bytes land in that node's memory;
it hands out accumulators and exports a segment's bytes into the object store
when a partial (or, with a bad placement, an update) must cross nodes.

``FunctionActor``: one aggregator function, pinned to the node the placement
chose. It runs ``function.Function`` unchanged; it may only attach segments of
its own node — anything else arrives as an object-store array (a zero-copy,
read-only numpy view). Calls carry JSON and numpy arrays only; no tensors or
Python objects are pickled on the hot path.
"""
from __future__ import annotations

import json
import os

import numpy as np
import ray
from prometheus_client import generate_latest

from ..config import MiB, ServerConfig
from ..function import Function
from ..gateway_pool import GatewayPool, reserve_port
from ..head_link import HeadLink
from ..metrics import Metrics
from ..node_gateway import NodeGateway, gateway_server
from ..shm import Arena
from ..transport import head_link_credentials, listen, server_credentials


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=64)
class NodeAgent:
    def __init__(self, node: str, prefix: str, config_json: str, head_address: str, secret: str):
        cfg = ServerConfig(**json.loads(config_json))
        self.node = node
        self.arena = Arena(cfg.shm_budget_mb * MiB, prefix=prefix)
        self.link = HeadLink(head_address, secret, node, credentials=head_link_credentials(cfg))
        self.gateway = NodeGateway(cfg, self.arena, self.link, Metrics())
        self.server = self.pool = self._reserved = None
        host = cfg.host if cfg.host not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()  # nosec B104  # a test of the bind address (any interface), not a bind
        if cfg.gateway_count() > 1:
            # the gateway pool: N processes on the node's port write into this node's arena; what
            # this node decides (its slot budget) is decided here, the rest at the head (the link)
            self._reserved = reserve_port(cfg.host, cfg.node_gateway_port)
            port = self._reserved.getsockname()[1]
            self.pool = GatewayPool(cfg, self.gateway, self.link, port, node=node).start()
        else:
            self.server = gateway_server(cfg, self.gateway.handlers(), [self.gateway.auth()])
            # the server's own TLS / mutual TLS (its files must exist at the same paths on every
            # node: the Helm chart mounts one secret in every pod), under the same plaintext rule
            port = listen(self.server, f"{cfg.host}:{cfg.node_gateway_port}", server_credentials(cfg))
            if not port:
                raise OSError(f"node {node}: cannot listen on {cfg.host}:{cfg.node_gateway_port}")
            self.server.start()
        self._address = f"{host}:{port}"

    def info(self) -> str:
        return json.dumps({"address": self._address, "pid": os.getpid(), "ray_node": _node_id()})

    def pool_info(self) -> str:
        """This node's gateway processes (none without a pool): name, pid, private address; and
        how many were replaced."""
        children = self.pool.children() if self.pool is not None else []
        return json.dumps({"children": [{"node": c.node, "pid": c.proc.pid, "address": c.address} for c in children],
                           "restarts": self.pool.restarts if self.pool is not None else 0})

    def ping(self) -> bool:
        return True

    def metrics_texts(self) -> list[bytes]:
        """This node's gateway metrics in the text format, for the head's /metrics to sum: the
        agent's own registry (the whole gateway, or a pool's deciding parent) and every live pool
        process's. Plain bytes: nothing of ours is pickled across Ray."""
        own = [generate_latest(self.gateway.metrics.registry)]
        return own + (self.pool.metrics_texts() if self.pool is not None else [])

    def scratch(self, size: int) -> str:
        return self.arena.scratch(size).name

    def release_scratch(self, name: str) -> None:
        self.arena.release_scratch(name)

    def release_slot(self, name: str) -> None:
        self.arena.release_slot(name)

    def export(self, name: str) -> np.ndarray:
        """A segment's bytes as an object-store array (one copy), to be read on another node."""
        return self.arena.get(name).array(np.uint8)

    def stats(self) -> str:
        st = self.arena.stats()
        return json.dumps({"slots_in_use": st.slots_in_use, "used": st.slot_bytes_in_use + st.slot_bytes_cached
                           + st.other_bytes, "budget": st.budget_bytes})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close(0.5)
            self._reserved.close()
        if self.server is not None:
            self.server.stop(0.5).wait()
        self.gateway.close()
        self.link.close()
        self.arena.close()


@ray.remote(max_restarts=0)
class FunctionActor:
    def __init__(self, local_prefixes: list[str]):
        self.fn = Function(tuple(p + "-" for p in local_prefixes))

    def ready(self) -> str:
        return json.dumps({"pid": os.getpid(), "ray_node": _node_id()})

    @ray.method(num_returns=2)
    def run(self, cmd_json: str, given: list[str], *arrays: np.ndarray):
        """One command. ``given`` names the arrays (imports). A finalize that writes segments of
        another node (``returns``: the result, a server step's master copy and state) writes them
        into one array, returned as the second value; a returned segment that was also given (the
        step's state: its other half is read) starts as a copy of it."""
        cmd = json.loads(cmd_json)
        self.fn.given = dict(zip(given, arrays))
        out = None
        if cmd.get("returns"):
            out = np.empty(sum(size for _, size, *_ in cmd["returns"]), np.uint8)
            at = 0
            for name, size, *_ in cmd["returns"]:
                view = out[at:at + size]
                if name in self.fn.given:
                    view[:] = self.fn.given[name]
                self.fn.given[name] = view
                at += size
        try:
            reply = {"seq": cmd.get("seq"), "ok": True, **self.fn.handle(cmd),
                     "given_bytes": {n: int(a.nbytes) for n, a in zip(given, arrays)}}
        except Exception as e:  # report, keep serving: the dispatcher decides
            reply = {"seq": cmd.get("seq"), "ok": False, "error": f"{type(e).__name__}: {e}"}
            out = None
        finally:
            self.fn.given = {}
        return json.dumps(reply), out
