"""The gRPC gateway: validate, write chunks into shared memory, emit descriptors.

Every refusal is a specific gRPC status with a message a person can act on, and
leaves the round untouched: the slot is returned, the client may retry (unless
its update was already accepted: ALREADY_EXISTS). Backpressure: a push whose
header is valid waits up to ``admission_timeout_s`` for a slot in the budget,
then gets RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer; the Python
client retries those by itself.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager

import grpc
import numpy as np

from . import __version__
from .errors import LiflError
from .fold import count_nonfinite
from .layout import Layout, LayoutError
from .rounds import State
from .shm import BudgetExhausted
from .v1 import aggregation_pb2 as pb
from .wire import chunk_payload, encode_chunk, parse

PULL_CHUNK = 2**20


def round_info(run) -> pb.RoundInfo:
    r = run.round
    info = pb.RoundInfo(job=r.job, round=r.id, state=int(r.state), expected=r.expected, quorum=r.quorum,
                        accepted=len(r.accepted), in_flight=len(r.in_flight), deadline_unix=r.deadline_unix,
                        total_weight=r.total_weight, detail=r.detail, opened_unix=r.opened,
                        closed_unix=r.closed, post_arrival_seconds=r.post_arrival_s)
    r.layout.to_proto(info.tensors)
    return info


def _spec_mismatch(got: Layout, want: Layout) -> str | None:
    if got.specs == want.specs:
        return None
    if len(got.specs) != len(want.specs):
        return f"update has {len(got.specs)} tensors, the round's model has {len(want.specs)}"
    for g, w in zip(got.specs, want.specs):
        if g != w:
            return (f"tensor {g.name!r} {g.dtype}{list(g.shape)} does not match the round's "
                    f"{w.name!r} {w.dtype}{list(w.shape)}")
    return "tensor specs differ"


class Gateway:
    def __init__(self, config, arena, dispatcher, metrics):
        self.config, self.arena, self.dispatcher, self.metrics = config, arena, dispatcher, metrics
        self.started = time.time()
        self._client_tokens = set(config.tokens)
        # chunks handed to gRPC and not yet sent, over all Pull streams: many clients pulling at once
        # then cost pull_buffer_mb of gateway memory, not a few chunks each (gRPC copies every one)
        self._pull_sends = threading.BoundedSemaphore(max(1, config.pull_buffer_mb * 2**20 // PULL_CHUNK))

    # -- plumbing ------------------------------------------------------------------
    def handlers(self) -> list[grpc.GenericRpcHandler]:
        agg = {
            "Push": grpc.stream_unary_rpc_method_handler(
                self._wrap(self.push, False), response_serializer=pb.PushReply.SerializeToString),
            "Pull": grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(self.pull, False), request_deserializer=pb.PullRequest.FromString),
            "GetRound": grpc.unary_unary_rpc_method_handler(
                self._wrap(self.get_round, False), request_deserializer=pb.GetRoundRequest.FromString,
                response_serializer=pb.RoundInfo.SerializeToString),
        }
        admin = {
            "OpenRound": grpc.stream_unary_rpc_method_handler(
                self._wrap(self.open_round, True), response_serializer=pb.RoundInfo.SerializeToString),
            "CloseRound": grpc.unary_unary_rpc_method_handler(
                self._wrap(self.close_round, True), request_deserializer=pb.CloseRoundRequest.FromString,
                response_serializer=pb.RoundInfo.SerializeToString),
            "Status": grpc.unary_unary_rpc_method_handler(
                self._wrap(self.status, False), request_deserializer=pb.StatusRequest.FromString,
                response_serializer=pb.StatusReply.SerializeToString),
        }
        return [grpc.method_handlers_generic_handler("lifl.v1.Aggregation", agg),
                grpc.method_handlers_generic_handler("lifl.v1.Admin", admin)]

    def _authorize(self, context, admin: bool) -> None:
        if not self._client_tokens and not self.config.admin_token:
            return
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not token:
            raise LiflError("UNAUTHENTICATED", "missing 'authorization: Bearer <token>' metadata")
        if admin:
            if token == self.config.admin_token:
                return
            if token in self._client_tokens:
                raise LiflError("PERMISSION_DENIED", "this token may push and pull, not administer rounds")
            raise LiflError("UNAUTHENTICATED", "unknown token")
        if token not in self._client_tokens and token != self.config.admin_token:
            raise LiflError("UNAUTHENTICATED", "unknown token")

    def _abort(self, context, e: LiflError, method: str):
        if method == "push":
            self.metrics.updates_rejected.labels(e.reason).inc()
        if e.retry_after_s is not None:
            context.set_trailing_metadata((("retry-after-ms", str(int(e.retry_after_s * 1000))),))
        context.abort(grpc.StatusCode[e.code], e.message)

    def _wrap(self, fn, admin: bool):
        def handler(request, context):
            try:
                self._authorize(context, admin)
                return fn(request, context)
            except LiflError as e:
                self._abort(context, e, fn.__name__)
        return handler

    def _wrap_stream(self, fn, admin: bool):
        def handler(request, context):
            try:
                self._authorize(context, admin)
                yield from fn(request, context)
            except LiflError as e:
                self._abort(context, e, fn.__name__)
        return handler

    def _first(self, it, cls, what: str):
        raw = next(it, None)
        if raw is None:
            raise LiflError("INVALID_ARGUMENT", f"empty stream: the first message must be a {what}")
        if len(raw) > self.config.header_limit_bytes:
            raise LiflError("INVALID_ARGUMENT", f"the {what} is {len(raw)} bytes; the limit is "
                                                f"{self.config.header_limit_bytes} (header_limit_bytes)")
        msg = parse(raw, cls, f"the first message ({what})")
        if msg.WhichOneof("kind") != "header":
            raise LiflError("INVALID_ARGUMENT", f"the first message must be a {what}, got {msg.WhichOneof('kind')}")
        return msg.header

    def _receive(self, it, dst: np.ndarray, cls, what: str, check=None, on_chunk=None) -> int:
        """Copy the chunks that follow a header into dst; return the byte count (must equal dst's size)."""
        size, pos = dst.nbytes, 0
        for raw in it:
            payload = chunk_payload(raw, cls, what)
            n = len(payload)
            if pos + n > size:
                raise LiflError("INVALID_ARGUMENT",
                                f"{what}: received more bytes than the declared total_size of {size}")
            np.copyto(dst[pos:pos + n], np.frombuffer(payload, np.uint8))
            if on_chunk is not None:
                on_chunk(pos, pos + n)
            pos += n
            if check is not None:
                check()
        if pos != size:
            raise LiflError("INVALID_ARGUMENT",
                            f"{what}: stream ended after {pos} bytes but total_size declares {size}")
        return pos

    # -- Aggregation -------------------------------------------------------------
    def push(self, it, context) -> pb.PushReply:
        h = self._first(it, pb.PushRequest, "PushHeader")
        if not (h.num_examples > 0 and math.isfinite(h.num_examples)):
            raise LiflError("INVALID_ARGUMENT", f"num_examples must be a positive number, got {h.num_examples}")
        if h.encoding not in (pb.ENCODING_UNSPECIFIED, pb.ENCODING_RAW):
            raise LiflError("INVALID_ARGUMENT", f"encoding {h.encoding} is not supported; use ENCODING_RAW")
        run = self.dispatcher.get(h.job, h.round)
        want = run.round.layout
        try:
            got = Layout.from_proto(h.tensors)
        except LayoutError as e:
            raise LiflError("INVALID_ARGUMENT", f"bad tensor spec: {e}") from None
        diff = _spec_mismatch(got, want)
        if diff:
            raise LiflError("INVALID_ARGUMENT", f"round {h.round}: {diff}")
        if h.total_size != want.total_size:
            raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {want.total_size}, the size of the "
                                                "round's model in the flat layout (64-byte aligned tensors)")
        self.dispatcher.begin_push(h.job, h.round, h.client_id)  # dedup + state
        slot = None
        accepted = False
        try:
            try:
                slot = self.arena.acquire_slot(want.total_size, timeout=self.config.admission_timeout_s)
            except BudgetExhausted as e:
                raise LiflError("RESOURCE_EXHAUSTED", f"{e}; retry later", retry_after_s=0.5) from None
            self.metrics.slots_in_use.set(self.arena.stats().slots_in_use)
            dst = slot.array(np.uint8, want.total_size)
            checked = [0]  # bytes scanned for NaN/Inf so far: each chunk is checked as it lands

            def scan(upto: int) -> None:
                bad = count_nonfinite(want, slot.buf, checked[0], upto)
                checked[0] = upto
                if bad:
                    name, n = bad[0]
                    raise LiflError("INVALID_ARGUMENT", f"tensor {name!r} has {n} NaN/Inf values; "
                                                        "the update was rejected (reject_nonfinite is on)")

            def on_chunk(start: int, end: int) -> None:
                # scan whole 64-byte lines received so far; an element never straddles one
                scan(end - end % 64 if end < want.total_size else end)

            self._receive(it, dst, pb.PushRequest, "update", check=lambda: self.dispatcher.check_open(run),
                          on_chunk=on_chunk if self.config.reject_nonfinite else None)
            self.dispatcher.check_open(run)
            n_acc = self.dispatcher.accept(run, h.client_id, slot.name, h.num_examples)
            accepted = True
            self.metrics.bytes_ingested.inc(want.total_size)
            return pb.PushReply(round=h.round, client_id=h.client_id, bytes_received=want.total_size,
                                accepted=n_acc)
        except LiflError:
            raise
        except grpc.RpcError:
            raise LiflError("CANCELLED", "the client cancelled the stream") from None
        finally:
            if not accepted:
                self.dispatcher.abandon(run, h.client_id)
                if slot is not None:
                    self.arena.release_slot(slot.name)

    def pull(self, req: pb.PullRequest, context):
        initial = req.kind == pb.MODEL_KIND_INITIAL
        with self.dispatcher.model(req.job, req.round, initial, req.wait_seconds) as (run, seg):
            r = run.round
            header = pb.ModelHeader(round=r.id, total_size=r.layout.total_size, encoding=pb.ENCODING_RAW,
                                    total_weight=0.0 if initial else r.total_weight,
                                    num_updates=0 if initial else len(r.accepted))
            r.layout.to_proto(header.tensors)
            yield pb.PullChunk(header=header).SerializeToString()
            buf = seg.buf
            for a in range(0, r.layout.total_size, PULL_CHUNK):
                with self._send_permit(context):
                    # gRPC asks for the next chunk only once this one is sent
                    yield encode_chunk(buf[a:a + PULL_CHUNK])

    @contextmanager
    def _send_permit(self, context):
        while not self._pull_sends.acquire(timeout=1.0):
            if not context.is_active():
                raise LiflError("CANCELLED", "the client cancelled the pull")
        try:
            yield
        finally:
            self._pull_sends.release()

    def get_round(self, req: pb.GetRoundRequest, context) -> pb.RoundInfo:
        return round_info(self.dispatcher.get(req.job, req.round))

    # -- Admin -----------------------------------------------------------------------
    def open_round(self, it, context) -> pb.RoundInfo:
        h = self._first(it, pb.OpenRoundRequest, "OpenRoundHeader")
        job = h.job or "default"
        initial = None
        try:
            if h.from_round:
                with self.dispatcher.model(job, h.from_round, False, 0.0) as (prev, seg):
                    layout = prev.round.layout
                    initial = self.arena.share(seg.name)   # the same bytes, not a copy
                if next(it, None) is not None:
                    raise LiflError("INVALID_ARGUMENT", "no model chunks may follow a header with from_round")
            else:
                try:
                    layout = Layout.from_proto(h.tensors)
                except LayoutError as e:
                    raise LiflError("INVALID_ARGUMENT", f"bad tensor spec: {e}") from None
                if h.total_size and h.total_size != layout.total_size:
                    raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {layout.total_size}, the "
                                                        "model's size in the flat layout")
                if h.total_size:
                    initial = self.arena.segment(layout.total_size)
                    self._receive(it, initial.array(np.uint8, layout.total_size), pb.OpenRoundRequest,
                                  "initial model")
                elif next(it, None) is not None:
                    raise LiflError("INVALID_ARGUMENT", "model chunks sent but total_size is 0")
            rnd = self.dispatcher.open_round(job, layout, h.expected, h.quorum, h.deadline_seconds, initial,
                                             from_round=h.from_round)
        except BaseException:
            if initial is not None:
                self.arena.free(initial.name)
            raise
        return round_info(self.dispatcher.get(job, rnd.id))

    def close_round(self, req: pb.CloseRoundRequest, context) -> pb.RoundInfo:
        self.dispatcher.close_round(req.job, req.round, req.abort)
        return round_info(self.dispatcher.get(req.job, req.round))

    def status(self, req, context) -> pb.StatusReply:
        st = self.arena.stats()
        rep = pb.StatusReply(version=__version__, uptime_seconds=time.time() - self.started,
                             shm_budget_bytes=st.budget_bytes,
                             shm_used_bytes=st.slot_bytes_in_use + st.slot_bytes_cached + st.other_bytes,
                             slots_in_use=st.slots_in_use,
                             hierarchy=self.dispatcher.last_plan or
                             f"static: leaves={self.config.leaves} fan_in={self.config.fan_in}")
        for r in self.dispatcher.rounds()[-20:]:
            rep.rounds.append(round_info(self.dispatcher.get(r.job, r.id)))
        for w in self.dispatcher.workers():
            rep.workers.append(pb.WorkerInfo(id=w.handle.id, pid=w.handle.pid, role=w.role,
                                             state=w.state().value, folds=w.folds,
                                             updates_folded=w.updates_folded, node=w.node))
        gateways = getattr(self.dispatcher.runtime, "gateways", None)
        if gateways is not None:
            rep.gateways.extend(f"{n}={a}" for n, a in sorted(gateways().items()))
        return rep
