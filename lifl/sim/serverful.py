"""The serverful baseline: one always-on process that collects every update, then averages them with
Flower's own FedAvg code (``flwr.server.strategy.aggregate.aggregate``).

It speaks the subset of LIFL's gRPC contract the simulator uses (OpenRound,
Push, CloseRound, GetRound, Pull, Status), so the same client pool and trace
drive both. What it does is what a classic FL server does: keep each update
whole in memory until the round closes, then aggregate all of them at once —
post-arrival latency and peak memory grow with the client count.

    python -m lifl.sim.serverful --port 0 --ready-file ready.json
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

from ..layout import Layout
from ..v1 import aggregation_pb2 as pb
from ..wire import chunk_payload

log = logging.getLogger("lifl.sim.serverful")
MiB = 2**20


@dataclass
class _Round:
    id: int
    layout: Layout
    expected: int
    quorum: int
    initial: bytes = b""
    updates: list = field(default_factory=list)     # (arrays, num_examples), whole, until close
    weight: float = 0.0
    state: int = pb.ROUND_STATE_OPEN
    detail: str = ""
    result: bytes | None = None
    last_arrival: float = 0.0
    post_arrival: float = 0.0
    opened: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)


class Serverful:
    def __init__(self):
        self._lock = threading.Lock()
        self._rounds: dict[int, _Round] = {}
        self._next = 1

    # -- helpers -------------------------------------------------------------------------------
    def _info(self, r: _Round) -> pb.RoundInfo:
        return pb.RoundInfo(job="default", round=r.id, state=r.state, expected=r.expected, quorum=r.quorum,
                            accepted=len(r.updates), total_weight=r.weight, detail=r.detail,
                            post_arrival_seconds=r.post_arrival)

    def _get(self, rid: int, ctx) -> _Round:
        r = self._rounds.get(rid)
        if r is None:
            ctx.abort(grpc.StatusCode.NOT_FOUND, f"round {rid} does not exist")
        return r

    @staticmethod
    def _read(layout: Layout, it, what: str) -> bytearray:
        buf, pos = bytearray(layout.total_size), 0
        for raw in it:
            piece = chunk_payload(raw, pb.PushRequest, what)
            buf[pos:pos + len(piece)] = piece
            pos += len(piece)
        if pos != layout.total_size:
            raise ValueError(f"{what}: {pos} of {layout.total_size} bytes")
        return buf

    def _aggregate(self, r: _Round) -> None:
        """Flower's FedAvg over every collected update (what a serverful server does at close)."""
        from flwr.server.strategy.aggregate import aggregate
        try:
            names = [s.name for s in r.layout.specs]
            mean = aggregate([([a[n] for n in names], int(w)) for a, w in r.updates])
            out = bytearray(r.layout.total_size)
            r.layout.pack_into({n: np.asarray(m).astype(a.dtype) for n, m, a in
                                zip(names, mean, r.updates[0][0].values())}, out)
            r.result, r.state = bytes(out), pb.ROUND_STATE_DONE
        except Exception as e:  # loud, and the round says why
            log.exception("round %d: aggregation failed", r.id)
            r.state, r.detail = pb.ROUND_STATE_FAILED, f"aggregation failed: {e}"
        r.updates.clear()
        r.post_arrival = time.monotonic() - r.last_arrival
        r.done.set()
        log.info("round %d done in %.3fs after the last arrival", r.id, r.post_arrival)

    def _close(self, r: _Round) -> None:
        r.state = pb.ROUND_STATE_AGGREGATING
        threading.Thread(target=self._aggregate, args=(r,), daemon=True).start()

    # -- RPCs ------------------------------------------------------------------------------------------
    def open_round(self, it, ctx):
        first = pb.OpenRoundRequest.FromString(next(it)).header
        with self._lock:
            if first.from_round:
                prev = self._get(first.from_round, ctx)
                layout, initial = prev.layout, prev.result or b""
            else:
                layout = Layout.from_proto(first.tensors)
                initial = bytes(self._read(layout, it, "initial model")) if first.total_size else b""
            r = _Round(self._next, layout, first.expected, first.quorum or first.expected, initial)
            self._rounds[r.id] = r
            self._next += 1
            return self._info(r)

    def push(self, it, ctx):
        h = pb.PushRequest.FromString(next(it)).header
        r = self._get(h.round, ctx)
        if r.state != pb.ROUND_STATE_OPEN:
            ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, f"round {r.id} is not open")
        buf = self._read(r.layout, it, "update")
        arrays = r.layout.views(buf)
        with self._lock:
            r.updates.append((arrays, h.num_examples))
            r.weight += h.num_examples
            r.last_arrival = time.monotonic()
            n = len(r.updates)
            if n >= r.expected:
                self._close(r)
        return pb.PushReply(round=r.id, client_id=h.client_id, bytes_received=len(buf), accepted=n)

    def close_round(self, req, ctx):
        r = self._get(req.round, ctx)
        with self._lock:
            if r.state != pb.ROUND_STATE_OPEN:
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, f"round {r.id} is not open")
            if len(r.updates) < r.quorum or not r.updates:
                r.state, r.detail = pb.ROUND_STATE_FAILED, "below quorum"
                r.done.set()
            else:
                self._close(r)
            return self._info(r)

    def get_round(self, req, ctx):
        return self._info(self._get(req.round, ctx))

    def pull(self, req, ctx):
        r = self._get(req.round, ctx)
        if req.kind == pb.MODEL_KIND_INITIAL:
            data = r.initial
        else:
            if not r.done.wait(req.wait_seconds):
                ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {r.id} has no result yet")
            if r.result is None:
                ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, f"round {r.id} failed: {r.detail}")
            data = r.result
        head = pb.ModelHeader(round=r.id, total_size=r.layout.total_size, total_weight=r.weight)
        r.layout.to_proto(head.tensors)
        yield pb.PullChunk(header=head)
        for i in range(0, len(data), MiB):
            yield pb.PullChunk(chunk=data[i:i + MiB])

    def status(self, req, ctx):
        return pb.StatusReply(version="serverful-baseline", rounds=[self._info(r) for r in self._rounds.values()])

    def handlers(self):
        ser = lambda m: m.SerializeToString()  # noqa: E731
        agg = grpc.method_handlers_generic_handler("lifl.v1.Aggregation", {
            "Push": grpc.stream_unary_rpc_method_handler(self.push, None, ser),
            "Pull": grpc.unary_stream_rpc_method_handler(self.pull, pb.PullRequest.FromString, ser),
            "GetRound": grpc.unary_unary_rpc_method_handler(self.get_round, pb.GetRoundRequest.FromString, ser)})
        adm = grpc.method_handlers_generic_handler("lifl.v1.Admin", {
            "OpenRound": grpc.stream_unary_rpc_method_handler(self.open_round, None, ser),
            "CloseRound": grpc.unary_unary_rpc_method_handler(self.close_round, pb.CloseRoundRequest.FromString, ser),
            "Status": grpc.unary_unary_rpc_method_handler(self.status, pb.StatusRequest.FromString, ser)})
        return [agg, adm]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lifl.sim.serverful", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = grpc.server(futures.ThreadPoolExecutor(32), handlers=Serverful().handlers(),
                         options=[("grpc.max_receive_message_length", 16 * MiB)])
    port = server.add_insecure_port(f"{a.host}:{a.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if a.ready_file:
        with open(a.ready_file, "w") as f:
            json.dump({"address": f"{a.host}:{port}", "metrics_port": -1}, f)
    log.info("serverful baseline on %s:%d", a.host, port)
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
