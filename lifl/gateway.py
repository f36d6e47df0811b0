"""The gRPC gateway: validate, write chunks into shared memory, emit descriptors.

Every refusal is a specific gRPC status with a message a person can act on, and
leaves the round untouched: the slot is returned, the client may retry (unless
its update was already accepted: ALREADY_EXISTS). Backpressure: a push whose
header is valid waits up to ``admission_timeout_s`` for a slot in the budget,
then gets RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer; the Python
client retries those by itself.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from contextlib import contextmanager

import grpc
import numpy as np
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from . import __version__
from .auth import Guard, Refusal, check_scope, current, policy_of
from .async_jobs import AsyncJob, AsyncJobs
from .async_proto import optimizer_from_proto, spec_from_proto
from .engine.optimizers import ServerOptimizer, pingpong_nbytes
from .errors import LiflError, quote
from .encoding import EncodedLayout, Encoding, encoded, scale_encoded, scan_received, write_trailer
from .encoding import parse as parse_encoding
from .fold import journal_bytes
from .layout import Layout, LayoutError
from .rounds import State, check_weight, job_name
from .shm import BudgetExhausted
from .v1 import aggregation_pb2 as pb
from .wire import chunk_payload, encode_chunk, parse

PULL_CHUNK = 2**20
MAX_PULL_WAIT_S = 3600.0   # a longer wait is clamped: a waiting Pull holds one of the server's threads
MAX_MESSAGE_CHARS = 1024   # status messages travel in trailers, which clients cap at 8–16 KiB

log = logging.getLogger("lifl.gateway")


def refusal(e: BaseException, method: str) -> LiflError:
    """The status a failed call gets: a LiflError as it is; a client that went away is CANCELLED;
    anything else is a bug — INTERNAL with an id that is also in the server's log."""
    if isinstance(e, LiflError):
        return e
    if isinstance(e, grpc.RpcError):
        return LiflError("CANCELLED", "the client cancelled the call")
    eid = os.urandom(4).hex()
    log.error("internal error %s in %s", eid, method, exc_info=e)
    return LiflError("INTERNAL", f"internal error {eid} in {method}; the server logged it under this id")


def check_encoding(encoding: int) -> None:
    """Initial models are RAW (encodings are for updates)."""
    if encoding not in (pb.ENCODING_UNSPECIFIED, pb.ENCODING_RAW):
        raise LiflError("INVALID_ARGUMENT", f"encoding {encoding} is not supported for a round's initial model; "
                                            "use ENCODING_RAW (compressed encodings are for pushed updates)")


def update_encoding(encoding: int) -> Encoding:
    """The encoding a PushHeader names (INVALID_ARGUMENT, with the choices, if unknown)."""
    try:
        return parse_encoding(encoding)
    except ValueError as e:
        raise LiflError("INVALID_ARGUMENT", f"encoding {encoding} is not supported: {e}") from None


def layout_of(tensors) -> Layout:
    try:
        return Layout.from_proto(tensors)
    except LayoutError as e:
        raise LiflError("INVALID_ARGUMENT", f"bad tensor spec: {e}") from None


def retry_trailers(code: grpc.StatusCode, message: str, after_s: float) -> tuple:
    """How long to wait before retrying, twice: the standard ``google.rpc.RetryInfo`` in the
    rich-status trailer (what gRPC's own retry tooling and other languages' clients read) and
    our plain ``retry-after-ms``."""
    info = Any()
    info.Pack(RetryInfo(retry_delay=Duration(seconds=int(after_s), nanos=int(after_s % 1 * 1e9))))
    status = Status(code=code.value[0], message=message, details=[info])
    return (("retry-after-ms", str(int(after_s * 1000))), ("grpc-status-details-bin", status.SerializeToString()))


def round_info(run) -> pb.RoundInfo:
    r = run.round
    info = pb.RoundInfo(job=r.job, round=r.id, state=int(r.state), expected=r.expected, quorum=r.quorum,
                        accepted=len(r.accepted), in_flight=len(r.in_flight), deadline_unix=r.deadline_unix,
                        total_weight=r.total_weight, detail=r.detail, opened_unix=r.opened,
                        closed_unix=r.closed, post_arrival_seconds=r.post_arrival_s)
    r.layout.to_proto(info.tensors)
    return info


def async_info(aj: AsyncJob) -> pb.RoundInfo:
    """An asynchronous job as a RoundInfo (round 0, mode ASYNC)."""
    with aj.cond:
        info = pb.RoundInfo(job=aj.name, round=0, mode=pb.JOB_MODE_ASYNC,
                            state=int(State.DONE if aj.closed.is_set() else State.FAILED if aj.failed
                                      else State.OPEN), accepted=aj.accepted,
                            total_weight=aj.total_weight, opened_unix=aj.opened, version=aj.job.latest,
                            buffer_fill=aj.job.buffer_fill, buffer_size=aj.spec.buffer_size,
                            refused_stale=aj.job.refused_stale,
                            detail=aj.failed or ("closed by an operator; " if aj.closed.is_set() else "")
                            + f"version {aj.job.latest}, buffer {aj.job.buffer_fill}/{aj.spec.buffer_size}")
    aj.layout.to_proto(info.tensors)
    return info


def _spec_mismatch(got: Layout, want: Layout) -> str | None:
    if got.specs == want.specs:
        return None
    if len(got.specs) != len(want.specs):
        return f"update has {len(got.specs)} tensors, the round's model has {len(want.specs)}"
    for g, w in zip(got.specs, want.specs):
        if g != w:
            return (f"tensor {quote(g.name)} {g.dtype}{quote(list(g.shape))} does not match the round's "
                    f"{quote(w.name)} {w.dtype}{quote(list(w.shape))}")
    return "tensor specs differ"


class ChunkScan:
    """Called with each chunk's byte range as it lands: checks the whole 64-byte lines received
    so far (an element never straddles one) — int8 block scales always, NaN/Inf when asked — and,
    when screening, adds the decoded values' Σx² to ``sumsq`` in the same pass
    (``encoding.scan_received``) over the freshly written, cache-warm bytes."""

    def __init__(self, enc: EncodedLayout, buf, nonfinite: bool, squares: bool):
        self.enc, self.buf, self.nonfinite, self.squares = enc, buf, nonfinite, squares
        self.checked, self.sumsq = 0, 0.0

    def __call__(self, start: int, end: int) -> None:
        upto = end - end % 64 if end < self.enc.total_size else end
        why, sq = scan_received(self.enc, self.buf, self.checked, upto, self.nonfinite, self.squares)
        self.sumsq += sq
        self.checked = upto
        if why:
            raise LiflError("INVALID_ARGUMENT", why)


class Gateway:
    def __init__(self, config, arena, dispatcher, metrics, clock=None):
        self.config, self.arena, self.dispatcher, self.metrics = config, arena, dispatcher, metrics
        self.clock = clock   # rate limits (None: the real clock)
        self.started = time.time()
        # chunks handed to gRPC and not yet sent, over all Pull streams: many clients pulling at once
        # then cost pull_buffer_mb of gateway memory, not a few chunks each (gRPC copies every one)
        self._pull_sends = threading.BoundedSemaphore(max(1, config.pull_buffer_mb * 2**20 // PULL_CHUNK))
        self.asyncs = AsyncJobs(arena, dispatcher, metrics)
        self._opt_states: dict[str, tuple] = {}     # job -> (optimizer, numel, state segment)
        self._opt_lock = threading.Lock()

    def close(self) -> None:
        """Stop what the gateway runs by itself (asynchronous jobs' publishers)."""
        self.asyncs.close()

    # -- plumbing ------------------------------------------------------------------
    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """Every method takes its request as bytes and parses it itself, so undecodable bytes are
        INVALID_ARGUMENT with a reason, never grpcio's INTERNAL "Exception deserializing"."""
        unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        agg = {
            "Push": grpc.stream_unary_rpc_method_handler(
                self._wrap(self.push), response_serializer=pb.PushReply.SerializeToString),
            "Pull": stream(self._wrap_stream(self.pull, pb.PullRequest)),
            "GetRound": unary(self._wrap(self.get_round, pb.GetRoundRequest),
                              response_serializer=pb.RoundInfo.SerializeToString),
        }
        admin = {
            "OpenRound": grpc.stream_unary_rpc_method_handler(
                self._wrap(self.open_round), response_serializer=pb.RoundInfo.SerializeToString),
            "CloseRound": unary(self._wrap(self.close_round, pb.CloseRoundRequest),
                                response_serializer=pb.RoundInfo.SerializeToString),
            "Status": unary(self._wrap(self.status, pb.StatusRequest),
                            response_serializer=pb.StatusReply.SerializeToString),
        }
        return [grpc.method_handlers_generic_handler("lifl.v1.Aggregation", agg),
                grpc.method_handlers_generic_handler("lifl.v1.Admin", admin)]

    def _abort(self, context, e: LiflError, method: str):
        if method == "push":
            self.metrics.updates_rejected.labels(e.reason).inc()
        if isinstance(e, Refusal):
            self.metrics.auth_refused.labels(e.why).inc()
            log.info("refused %s from %s: %s %s (%s)", method, context.peer(), e.code, e.message, e.why)
        msg = e.message if len(e.message) <= MAX_MESSAGE_CHARS else e.message[:MAX_MESSAGE_CHARS] + "…"
        if e.retry_after_s is not None:
            context.set_trailing_metadata(retry_trailers(grpc.StatusCode[e.code], msg, e.retry_after_s))
        context.abort(grpc.StatusCode[e.code], msg)

    @staticmethod
    def _request(raw, cls):
        return raw if cls is None else parse(raw, cls, "the request")

    def auth(self) -> Guard:
        """The interceptor that authenticates, authorizes and rate-limits every call before its
        handler runs (``lifl.auth``); key files are read now."""
        def refused(method: str, err: Refusal) -> None:
            self.metrics.auth_refused.labels(err.why).inc()
            if method.endswith("/Push"):
                self.metrics.updates_rejected.labels(err.reason).inc()
        limiter = None
        if self.config.rate_limit_per_s > 0:
            from .engine.clock import SystemClock
            from .ratelimit import RateLimiter
            limiter = RateLimiter(self.config.rate_limit_per_s, self.config.rate_limit_burst,
                                  self.clock or SystemClock())
        return Guard(policy_of(self.config), limiter, refused, trailers=retry_trailers)

    def _wrap(self, fn, cls=None):
        def handler(request, context):
            try:
                return fn(self._request(request, cls), context)
            except Exception as e:
                err = refusal(e, fn.__name__)
            self._abort(context, err, fn.__name__)
        return handler

    def _wrap_stream(self, fn, cls=None):
        def handler(request, context):
            try:
                yield from fn(self._request(request, cls), context)
                return
            except Exception as e:
                err = refusal(e, fn.__name__)
            self._abort(context, err, fn.__name__)
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
        check_scope(current(), job_name(h.job), h.round, h.client_id)
        check_weight(h.num_examples)
        encoding = update_encoding(h.encoding)
        aj = self.asyncs.get(job_name(h.job))
        if aj is not None or h.HasField("base_version"):
            return self._push_async(h, aj, it, encoding)
        run = self.dispatcher.get(h.job, h.round)
        enc = self._check_update_layout(h, run.round.layout, f"round {h.round}", encoding)
        self.dispatcher.begin_push(h.job, h.round, h.client_id)  # dedup + state
        n_acc = self._ingest(it, enc, check=lambda: self.dispatcher.check_open(run),
                             accept=lambda slot: self.dispatcher.accept(run, h.client_id, slot, h.num_examples),
                             abandon=lambda: self.dispatcher.abandon(run, h.client_id))
        return pb.PushReply(round=h.round, client_id=h.client_id, bytes_received=enc.total_size, accepted=n_acc)

    def _push_async(self, h: pb.PushHeader, aj: AsyncJob | None, it, encoding: Encoding) -> pb.PushReply:
        if aj is None:
            raise LiflError("INVALID_ARGUMENT", f"job {quote(job_name(h.job))} has no asynchronous job open; "
                                                "base_version is only for asynchronous jobs (push by round)")
        if not h.HasField("base_version"):
            raise LiflError("INVALID_ARGUMENT", f"job {quote(aj.name)} is asynchronous: set base_version to the "
                                                f"version the delta was trained on (current: {aj.job.latest})")
        if encoding is not Encoding.RAW:
            raise LiflError("INVALID_ARGUMENT", f"asynchronous job {quote(aj.name)}: deltas are pushed raw "
                                                f"(encoding {encoding.name.lower()} is for rounds)")
        enc = self._check_update_layout(h, aj.layout, f"asynchronous job {quote(aj.name)}", encoding)
        self.asyncs.check(aj, h.client_id, h.base_version)
        t = self._ingest(it, enc, check=None, abandon=lambda: None,
                         accept=lambda slot: self.asyncs.accept(aj, h.client_id, h.base_version, h.num_examples,
                                                                slot))
        return pb.PushReply(client_id=h.client_id, bytes_received=aj.layout.total_size, accepted=t.position,
                            version=t.buffer, staleness=t.tau)

    @staticmethod
    def _check_update_layout(h: pb.PushHeader, want: Layout, where: str, encoding: Encoding) -> EncodedLayout:
        diff = _spec_mismatch(layout_of(h.tensors), want)
        if diff:
            raise LiflError("INVALID_ARGUMENT", f"{where}: {diff}")
        enc = encoded(want, encoding)
        if h.total_size != enc.total_size:
            raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {enc.total_size}, {enc.describe()}")
        return enc

    def _ingest(self, it, enc: EncodedLayout, check, accept, abandon):
        """Receive an update's chunks into a slot and hand it to ``accept``; on any failure
        ``abandon`` and give the slot back (nothing recorded)."""
        slot = None
        accepted = False
        try:
            try:
                slot = self.arena.acquire_slot(enc.slot_size, timeout=self.config.admission_timeout_s)
            except BudgetExhausted as e:
                raise LiflError("RESOURCE_EXHAUSTED", f"{e}; retry later", retry_after_s=0.5) from None
            self.metrics.slots_in_use.set(self.arena.stats().slots_in_use)
            dst = slot.array(np.uint8, enc.total_size)
            scan = self._scanner(enc, slot.buf)
            self._receive(it, dst, pb.PushRequest, "update", check=check, on_chunk=scan)
            if scan is not None:
                self._screen(enc, slot.buf, scan.sumsq)
            write_trailer(enc, slot.buf)
            if check is not None:
                check()
            result = accept(slot.name)
            accepted = True
            self.metrics.bytes_ingested.inc(enc.total_size)
            return result
        except LiflError:
            raise
        except grpc.RpcError:
            raise LiflError("CANCELLED", "the client cancelled the stream") from None
        finally:
            if not accepted:
                abandon()
                if slot is not None:
                    self.arena.release_slot(slot.name)

    def _scanner(self, enc: EncodedLayout, buf) -> "ChunkScan | None":
        """The check each landed chunk gets (None: none): int8 block scales (always), NaN/Inf
        (``reject_nonfinite``) and the running Σx² for the L2 screen (``screen_l2_max``)."""
        nonfinite, screen = self.config.reject_nonfinite, self.config.screen_l2_max > 0
        needed = nonfinite or screen or enc.encoding is Encoding.INT8_BLOCK256
        return ChunkScan(enc, buf, nonfinite, screen) if needed else None

    def _screen(self, enc: EncodedLayout, buf, sumsq: float) -> None:
        """Apply the L2-norm bound to a whole received update: reject it, or scale its float
        tensors so that their norm is the bound (before the engine ever sees it)."""
        bound = self.config.screen_l2_max
        if bound <= 0:
            return
        norm = math.sqrt(sumsq)
        if norm <= bound:
            return
        if self.config.screen_mode == "clip" and math.isfinite(norm):
            scale_encoded(enc, buf, bound / norm)
            self.metrics.updates_screened.labels("clipped").inc()
            return
        self.metrics.updates_screened.labels("rejected").inc()
        raise LiflError("INVALID_ARGUMENT", f"the update's L2 norm {norm:.6g} is over this server's bound "
                                            f"{bound:g} (screen_l2_max, screen_mode {self.config.screen_mode})")

    def pull(self, req: pb.PullRequest, context):
        check_scope(current(), job_name(req.job))
        initial = req.kind == pb.MODEL_KIND_INITIAL
        wait = req.wait_seconds
        if math.isnan(wait) or wait < 0:
            raise LiflError("INVALID_ARGUMENT", f"wait_seconds must be >= 0, got {wait}")
        aj = self.asyncs.get(job_name(req.job))
        if aj is not None:
            yield from self._pull_version(aj, req, min(wait, MAX_PULL_WAIT_S), context)
            return
        if req.latest or req.version:
            raise LiflError("INVALID_ARGUMENT", f"job {quote(job_name(req.job))} is not asynchronous: pull a "
                                                "round's result by its round number")
        with self.dispatcher.model(req.job, req.round, initial, min(wait, MAX_PULL_WAIT_S),
                                   alive=context.is_active) as (run, seg):
            r = run.round
            header = pb.ModelHeader(round=r.id, total_size=r.layout.total_size, encoding=pb.ENCODING_RAW,
                                    total_weight=0.0 if initial else r.total_weight,
                                    num_updates=0 if initial else len(r.accepted))
            yield from self._send_model(header, r.layout, seg, context)

    def _pull_version(self, aj: AsyncJob, req: pb.PullRequest, wait: float, context):
        with self.asyncs.model(aj, None if req.latest else req.version, wait, alive=context.is_active) as (v, seg):
            header = pb.ModelHeader(total_size=aj.layout.total_size, encoding=pb.ENCODING_RAW, version=v)
            yield from self._send_model(header, aj.layout, seg, context)

    def _send_model(self, header: pb.ModelHeader, layout: Layout, seg, context):
        layout.to_proto(header.tensors)
        yield pb.PullChunk(header=header).SerializeToString()
        buf = seg.buf
        for a in range(0, layout.total_size, PULL_CHUNK):
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
        check_scope(current(), job_name(req.job))
        aj = self.asyncs.get(job_name(req.job))
        if aj is not None and req.round == 0:
            return async_info(aj)
        return round_info(self.dispatcher.get(req.job, req.round))

    # -- Admin -----------------------------------------------------------------------
    def open_round(self, it, context) -> pb.RoundInfo:
        h = self._first(it, pb.OpenRoundRequest, "OpenRoundHeader")
        job = job_name(h.job)
        check_scope(current(), job)
        check_encoding(h.encoding)
        if h.mode == pb.JOB_MODE_ASYNC:
            return self._open_async(h, job, it)
        if h.mode not in (pb.JOB_MODE_UNSPECIFIED, pb.JOB_MODE_SYNC):
            raise LiflError("INVALID_ARGUMENT", f"unknown job mode {h.mode}; use JOB_MODE_SYNC or JOB_MODE_ASYNC")
        if h.HasField("async_options"):
            raise LiflError("INVALID_ARGUMENT", "async_options are for mode JOB_MODE_ASYNC only")
        opt = optimizer_from_proto(h.optimizer) if h.HasField("optimizer") else None
        if opt is not None and opt.is_identity:
            opt = None
        if opt is not None and self.config.runtime != "local":
            raise LiflError("UNIMPLEMENTED", "server optimizers on synchronous rounds need the local runtime on "
                                             "this server; use an asynchronous job, or Flower's strategy "
                                             "(lifl.flower) for FedAvgM/FedAdam/FedYogi/FedAdagrad rounds")
        if self.asyncs.get(job) is not None:
            raise LiflError("FAILED_PRECONDITION", f"job {quote(job)} is asynchronous: it has versions, not rounds; "
                                                   "open rounds under another job name")
        initial = None
        try:
            if h.from_round:
                with self.dispatcher.model(job, h.from_round, False, 0.0) as (prev, seg):
                    layout = prev.round.layout
                    initial = self.arena.share(seg.name)   # the same bytes, not a copy
                if next(it, None) is not None:
                    raise LiflError("INVALID_ARGUMENT", "no model chunks may follow a header with from_round")
            else:
                layout = layout_of(h.tensors)
                if h.total_size and h.total_size != layout.total_size:
                    raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {layout.total_size}, the "
                                                        "model's size in the flat layout")
                self._check_room(layout, with_initial=bool(h.total_size))
                if h.total_size:
                    initial = self.arena.segment(layout.total_size)
                    self._receive(it, initial.array(np.uint8, layout.total_size), pb.OpenRoundRequest,
                                  "initial model")
                elif next(it, None) is not None:
                    raise LiflError("INVALID_ARGUMENT", "model chunks sent but total_size is 0")
            step = None
            if opt is not None:
                if initial is None:
                    raise LiflError("INVALID_ARGUMENT", "a server optimizer steps from the round's initial model: "
                                                        "stream it after the header or open with from_round")
                step = self._optimizer_step(job, opt, layout, initial.name)
            rnd = self.dispatcher.open_round(job, layout, h.expected, h.quorum, h.deadline_seconds, initial,
                                             from_round=h.from_round, step=step)
        except BaseException:
            if initial is not None:
                self.arena.free(initial.name)
            raise
        return round_info(self.dispatcher.get(job, rnd.id))

    def _optimizer_step(self, job: str, opt: ServerOptimizer, layout: Layout, base: str) -> dict:
        """The finalize step of a round of ``job``: its optimizer state (shared memory, double
        buffered) carries over from the job's previous round when the optimizer and model size
        are the same, else it starts afresh."""
        with self._opt_lock:
            held = self._opt_states.get(job)
            if held is None or held[0] != opt or held[1] != layout.numel:
                if held is not None:
                    self.arena.free(held[2].name)
                seg = self.arena.segment(pingpong_nbytes(opt, layout.numel))
                seg.array(np.uint8)[:] = 0
                self._opt_states[job] = held = (opt, layout.numel, seg)
        return {"opt": dataclasses.asdict(opt), "base": base, "state": held[2].name}

    def _open_async(self, h: pb.OpenRoundHeader, job: str, it) -> pb.RoundInfo:
        spec = spec_from_proto(h.async_options, h.optimizer if h.HasField("optimizer") else None)
        if h.from_round or not h.total_size:
            raise LiflError("INVALID_ARGUMENT", "an asynchronous job opens with its initial model (version 0) "
                                                "streamed after the header; from_round is not supported")
        layout = layout_of(h.tensors)
        if h.total_size != layout.total_size:
            raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {layout.total_size}, the "
                                                "model's size in the flat layout")
        self._check_room(layout, with_initial=True)
        initial = self.arena.segment(layout.total_size)
        try:
            self._receive(it, initial.array(np.uint8, layout.total_size), pb.OpenRoundRequest, "initial model")
            aj = self.asyncs.open(job, layout, initial, spec)
        except BaseException:
            self.arena.free(initial.name)
            raise
        return async_info(aj)

    def _check_room(self, layout: Layout, with_initial: bool) -> None:
        """Refuse a model no update could ever be pushed for, or one shared memory cannot hold,
        before anything is allocated: a 40-byte header may declare an exabyte."""
        limit = min(self.config.max_model_mb * 2**20, self.arena.budget)
        if layout.total_size > limit:
            raise LiflError("INVALID_ARGUMENT",
                            f"the model is {layout.total_size} bytes; this server takes models up to {limit} bytes "
                            "(max_model_mb, and an update must fit in shm_budget_mb)")
        # the initial model, one leaf's float64 sum and its journal, and the result
        need = layout.total_size * (2 if with_initial else 1) + layout.numel * 8 + journal_bytes(layout.numel)
        self.arena.ensure_room(need, f"a round of a {layout.total_size}-byte model")

    def close_round(self, req: pb.CloseRoundRequest, context) -> pb.RoundInfo:
        check_scope(current(), job_name(req.job))
        if req.round == 0 and self.asyncs.get(job_name(req.job)) is not None:
            return async_info(self.asyncs.close_job(job_name(req.job)))
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
        for aj in self.asyncs.all():
            rep.rounds.append(async_info(aj))
        for w in self.dispatcher.snapshot().functions:
            rep.workers.append(pb.WorkerInfo(id=w.id, pid=w.pid, role=w.role, state=w.state, folds=w.folds,
                                             updates_folded=w.updates_folded, node=w.node))
        rep.gateways.extend(f"{n}={a}" for n, a in sorted(self.dispatcher.runtime.gateways().items()))
        return rep
