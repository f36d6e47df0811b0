"""An asynchronous (FedBuff) ServerApp loop for Flower's Message API: no round barrier.

    from lifl.flower import AsyncFedBuff
    from lifl.engine.buffered import AsyncSpec
    fb = AsyncFedBuff(AsyncSpec(buffer_size=4, concurrency=8), address="127.0.0.1:50051")
    result = fb.start(grid, initial_arrays, num_versions=20)

It keeps ``spec.concurrency`` SuperNodes training at all times. Each gets the newest model
version with its number (``lifl.base-version``); when its reply comes back the node is handed
the model that is newest *then* — it never waits for the others. Flower has no asynchronous
strategy; this loop is that strategy, over ``grid.push_messages`` / ``grid.pull_messages``.

Two places can aggregate:

* ``address`` given: LIFL. The ServerApp opens an asynchronous job; ``lifl_mod`` on each
  ClientApp pushes the *delta* (reply − model it received) with its base version straight to
  LIFL's gateway, so updates never pass through the SuperLink; the reply carries a receipt.
  The loop reads new versions from LIFL (``pull latest``).
* ``address=None``: in this process, float64 (:class:`lifl.engine.buffered.FedBuffModel`)
  from the replies' arrays — for apps without a LIFL server, and as the same algorithm's peer.

A node whose update was refused because it already has one in the open buffer (it is much
faster than the others) is parked until a new version is published, then handed that one.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..client import Client, RpcFailure
from ..engine.buffered import AsyncSpec, FedBuffModel
from ..errors import LiflError
from . import config as K
from .mod import arrays_to_numpy, numpy_to_arrays, pull_arrays_version

log = logging.getLogger("flwr.lifl")


@dataclass
class AsyncResult:
    arrays: ArrayRecord             # the newest version when the loop stopped
    version: int
    events: list[dict] = field(default_factory=list)   # one per reply: node, base, outcome, version, staleness


class _Local:
    """FedBuff in this process, from the replies' arrays."""

    def __init__(self, spec: AsyncSpec, initial: ArrayRecord):
        self.names = list(initial.keys())
        x0 = arrays_to_numpy(initial)
        self.shapes = [(k, v.shape, v.dtype) for k, v in x0.items()]
        self.model = FedBuffModel(spec, np.concatenate([np.asarray(v, np.float64).ravel() for v in x0.values()]))

    def latest(self) -> tuple[int, ArrayRecord]:
        x, out, pos = self.model.pull(), OrderedDict(), 0
        for k, shape, dt in self.shapes:
            n = int(np.prod(shape))
            out[k] = x[pos:pos + n].reshape(shape).astype(dt)
            pos += n
        return self.model.latest, numpy_to_arrays(out)

    def version(self) -> int:
        return self.model.latest

    def take(self, reply: Message, node: int, base: int, sent: ArrayRecord, akey: str, wkey: str) -> dict:
        new = arrays_to_numpy(reply.content[akey])
        old = arrays_to_numpy(sent)
        delta = np.concatenate([(np.asarray(new[k], np.float64) - np.asarray(old[k], np.float64)).ravel()
                                for k in self.names])
        weight = float(_metric(reply, wkey))
        t = self.model.push(f"node-{node}", base, weight, delta)
        return {"outcome": "accepted", "version": t.buffer, "staleness": t.tau, "weight": weight}


class _Lifl:
    """FedBuff in LIFL: the mod pushes deltas to the gateway; this side reads versions."""

    def __init__(self, spec: AsyncSpec, initial: ArrayRecord, address: str, job: str, token: str | None):
        self.client, self.job = Client(address, token=token), job
        self.client.open_async(arrays_to_numpy(initial), spec, job=job)
        self._cached: tuple[int, ArrayRecord] = (0, initial)

    def version(self) -> int:
        return self.client.job_info(self.job).version

    def latest(self) -> tuple[int, ArrayRecord]:
        v = self.version()
        if v != self._cached[0]:
            self._cached = pull_arrays_version(self.client, "latest", job=self.job)
        return self._cached

    def take(self, reply: Message, node: int, base: int, sent, akey: str, wkey: str) -> dict:
        r = reply.content.config_records.get(K.RECEIPT)
        if r is None:
            raise LiflError("FAILED_PRECONDITION", f"node {node} replied without a LIFL receipt: is lifl_mod "
                                                   "installed in its ClientApp?")
        return {"outcome": "accepted", "version": int(r["version"]), "staleness": int(r["staleness"]),
                "weight": float(_metric(reply, wkey))}

    def close(self) -> None:
        self.client.close()


def _metrics(reply: Message) -> dict:
    if reply.has_error():
        return {}
    return {k: v for rec in reply.content.metric_records.values() for k, v in rec.items()
            if isinstance(v, (int, float))}


def _metric(reply: Message, key: str):
    for rec in reply.content.metric_records.values():
        if key in rec:
            return rec[key]
    raise LiflError("INVALID_ARGUMENT", f"the reply has no weighting metric {key!r}")


class AsyncFedBuff:
    """FedBuff over a Flower Grid (see the module docstring)."""

    def __init__(self, spec: AsyncSpec, address: str | None = None, job: str = "flower-async",
                 client_address: str | None = None, token: str | None = None,
                 weighted_by_key: str = "num-examples", arrayrecord_key: str = "arrays",
                 configrecord_key: str = "config", poll_s: float = 0.05):
        self.spec = spec.validate()
        self.address, self.client_address = address, client_address or address
        self.job, self.token = job, token
        self.wkey, self.akey, self.ckey, self.poll_s = weighted_by_key, arrayrecord_key, configrecord_key, poll_s

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_versions: int,
              train_config: ConfigRecord | None = None, timeout: float = 3600.0) -> AsyncResult:
        """Train until version ``num_versions`` is published (or ``timeout`` seconds pass)."""
        give_up = time.monotonic() + timeout
        backend = (_Lifl(self.spec, initial_arrays, self.address, self.job, self.token) if self.address
                   else _Local(self.spec, initial_arrays))
        events: list[dict] = []
        inflight: dict[str, tuple[int, int, ArrayRecord]] = {}    # message id -> node, base, model sent
        parked: dict[int, int] = {}                                # node -> base it was refused on
        try:
            nodes = self._nodes(grid, give_up)
            v, model = backend.latest()
            for n in nodes:
                self._send(grid, n, v, model, train_config, inflight)
            while backend.version() < num_versions:
                if time.monotonic() > give_up:
                    log.warning("AsyncFedBuff: timeout at version %d of %d", backend.version(), num_versions)
                    break
                replies = list(grid.pull_messages(list(inflight)))
                if not replies:
                    v = backend.version()
                    for n in [n for n, b in parked.items() if v > b]:
                        del parked[n]
                        v, model = backend.latest()
                        self._send(grid, n, v, model, train_config, inflight)
                    time.sleep(self.poll_s)
                    continue
                for r in replies:
                    sent = inflight.pop(r.metadata.reply_to_message_id, None)
                    if sent is None:
                        continue
                    node, base, sent_model = sent
                    ev = {"node": node, "base": base, "metrics": _metrics(r)}
                    try:
                        if r.has_error():
                            raise LiflError(_status_name(r.error.code), r.error.reason)
                        ev.update(backend.take(r, node, base, sent_model, self.akey, self.wkey))
                    except LiflError as e:
                        ev.update(outcome=e.code, reason=e.message[:200])
                    events.append(ev)
                    if ev["outcome"] == "ALREADY_EXISTS" and backend.version() <= base:
                        parked[node] = base            # hand it the next version, not the same one
                        continue
                    v, model = backend.latest()
                    self._send(grid, node, v, model, train_config, inflight)
            self._drain(grid, inflight, events, backend, num_versions, give_up)
            v, model = backend.latest()
            return AsyncResult(model, v, events)
        finally:
            if isinstance(backend, _Lifl):
                backend.close()

    def _drain(self, grid: Grid, inflight: dict, events: list[dict], backend, num_versions: int,
               give_up: float) -> None:
        """Read the replies of updates already in the published buffers (their nodes pushed them
        before the loop saw the version), so ``events`` accounts for every version; up to 10 s."""
        need = self.spec.buffer_size * num_versions
        until = min(give_up, time.monotonic() + 10.0)
        while inflight and time.monotonic() < until:
            if sum(1 for e in events if e.get("outcome") == "accepted" and e["version"] <= num_versions) >= need:
                return
            for r in grid.pull_messages(list(inflight)):
                sent = inflight.pop(r.metadata.reply_to_message_id, None)
                if sent is None or r.has_error():
                    continue
                ev = {"node": sent[0], "base": sent[1], "metrics": _metrics(r)}
                try:
                    ev.update(backend.take(r, sent[0], sent[1], sent[2], self.akey, self.wkey))
                except LiflError as e:
                    ev.update(outcome=e.code, reason=e.message[:200])
                events.append(ev)
            time.sleep(self.poll_s)

    def _nodes(self, grid: Grid, give_up: float) -> list[int]:
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.spec.concurrency:
                return nodes[:self.spec.concurrency]
            if time.monotonic() > give_up:
                raise RuntimeError(f"only {len(nodes)} nodes connected, concurrency is {self.spec.concurrency}")
            log.info("AsyncFedBuff: waiting for nodes: %d of %d connected", len(nodes), self.spec.concurrency)
            time.sleep(1.0)

    def _send(self, grid: Grid, node: int, version: int, model: ArrayRecord, train_config: ConfigRecord | None,
              inflight: dict) -> None:
        cfg = ConfigRecord(dict(train_config or {}))
        cfg.update({"server-round": version + 1, K.BASE_VERSION: version, K.WEIGHT_KEY: self.wkey,
                    K.ARRAYS_KEY: self.akey})
        if self.address:
            cfg.update({K.ROUND: 0, K.JOB: self.job, K.ADDRESS: self.client_address})
        msg = Message(content=RecordDict({self.akey: model, self.ckey: cfg}), dst_node_id=node,
                      message_type=MessageType.TRAIN)
        for mid in grid.push_messages([msg]):
            inflight[mid] = (node, version, model)


def _status_name(code: int) -> str:
    st = K.status_of(code)
    return st.name if st is not None else "UNKNOWN"
