"""The gRPC gateway: validate, write chunks into shared memory, emit descriptors.

Every refusal is a specific gRPC status with a message a person can act on, and
leaves the round untouched: the slot is returned, the client may retry. A repeat of an
accepted update is read without storing it and succeeds as a duplicate when its content is
identical (a retry after a lost reply), else ALREADY_EXISTS (docs/clients.md). Backpressure: a push whose
header is valid waits up to ``admission_timeout_s`` for a slot in the budget,
then gets RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer; the Python
client retries those by itself.
"""
from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager

import grpc
import numpy as np

from .auth import Guard, Refusal, check_scope, current, policy_of, take_rate
from .async_jobs import AsyncJob, AsyncJobs, needs_base_version
from .errors import LiflError, quote
from .engine.clock import SystemClock
from .content_hash import checks_while_copying
from .encoding import EncodedLayout, ElementChecks, Encoding, encoded, scale_encoded, scan_received, write_trailer
from .layout import Layout
from .ratelimit import RateLimiter
from .rounds import Digest, Duplicate, check_weight, job_name
from .shm import BudgetExhausted, Segment
from .v1 import aggregation_pb2 as pb
from .wire import encode_chunk

PULL_CHUNK = 2**20
MAX_PULL_WAIT_S = 3600.0   # a longer wait is clamped: a waiting Pull holds one of the server's threads

log = logging.getLogger("lifl.gateway")


from .admin import Admin
from .rpc import Service, async_info, retry_trailers, round_info, specs_mismatch, update_encoding

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


class Gateway(Service):
    """The Aggregation service (Push, Pull, GetRound), and the server's handlers for it and for
    the Admin service (``lifl.admin``)."""

    def __init__(self, config, arena, dispatcher, metrics, clock=None):
        super().__init__(config, arena, dispatcher, metrics)
        self.clock = clock   # rate limits (None: the real clock)
        # one rate limit for every way into the server: its own port, relays, pooled pushes
        self.limiter = (RateLimiter(config.rate_limit_per_s, config.rate_limit_burst, clock or SystemClock())
                        if config.rate_limit_per_s > 0 and not self.relays else None)
        # chunks handed to gRPC and not yet sent, over all Pull streams: many clients pulling at once
        # then cost pull_buffer_mb of gateway memory, not a few chunks each (gRPC copies every one)
        self._pull_sends = threading.BoundedSemaphore(max(1, config.pull_buffer_mb * 2**20 // PULL_CHUNK))
        self.asyncs = AsyncJobs(arena, dispatcher, metrics)
        self.admin = Admin(config, arena, dispatcher, metrics, self.asyncs)

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
        a = self.admin
        admin = {
            "OpenRound": grpc.stream_unary_rpc_method_handler(
                a._wrap(a.open_round), response_serializer=pb.RoundInfo.SerializeToString),
            "CloseRound": unary(a._wrap(a.close_round, pb.CloseRoundRequest),
                                response_serializer=pb.RoundInfo.SerializeToString),
            "Status": unary(a._wrap(a.status, pb.StatusRequest),
                            response_serializer=pb.StatusReply.SerializeToString),
        }
        return [grpc.method_handlers_generic_handler("lifl.v1.Aggregation", agg),
                grpc.method_handlers_generic_handler("lifl.v1.Admin", admin)]

    relays = False   # a gateway that relays to the head (a pool process, a Ray node's): the head limits

    def auth(self, relay_secret: str = "") -> Guard:  # nosec B107  # "": trust no relayed principal
        """The interceptor that authenticates, authorizes and rate-limits every call before its
        handler runs (``lifl.auth``); key files are read now. ``relay_secret``: calls relayed by
        this server's other gateways carry it, and their callers' principals with it."""
        return Guard(policy_of(self.config), self.limiter, self._refused, trailers=retry_trailers,
                     relay_secret=relay_secret, relaying=self.relays)

    def _refused(self, method: str, err: Refusal) -> None:
        self.metrics.auth_refused.labels(err.why).inc()
        if method.endswith("/Push"):
            self.metrics.updates_rejected.labels(err.reason).inc()

    def admit_rate(self, key: str) -> None:
        """A push that another gateway of this server received: one call from ``key``'s bucket of
        this (the head's) rate limit, refused as the head's own Guard would refuse it."""
        if self.limiter is None or not key:
            return
        try:
            take_rate(self.limiter, key)
        except Refusal as e:
            self._refused("/lifl.v1.Aggregation/Push", e)
            raise

    # -- Aggregation -------------------------------------------------------------
    def push(self, it, context) -> pb.PushReply:
        h = self._first(it, pb.PushRequest, "PushHeader")
        check_scope(current(), job_name(h.job), h.round, h.client_id)
        check_weight(h.num_examples)
        encoding = update_encoding(h.encoding)
        aj = self._async_job(h)
        if aj is not None or h.HasField("base_version"):
            return self._push_async(h, aj, it, encoding)
        run = self.dispatcher.get(h.job, h.round)
        enc = self._check_update_layout(h, run.round.layout, f"round {h.round}", encoding)
        try:
            slot = self._begin(h, enc)  # dedup + state
        except Duplicate as dup:
            if dup.prior is None:
                raise
            return self._repeat(h, it, enc, dup)
        digest = Digest(h.num_examples, int(enc.encoding))
        n_acc = self._ingest(it, enc, check=lambda: self.dispatcher.check_open(run),
                             accept=lambda slot: self.dispatcher.accept(run, h.client_id, slot, h.num_examples,
                                                                        digest=digest),
                             abandon=lambda: self.dispatcher.abandon(run, h.client_id), digest=digest, slot=slot)
        return pb.PushReply(round=h.round, client_id=h.client_id, bytes_received=enc.total_size, accepted=n_acc)

    def _begin(self, h: pb.PushHeader, enc: EncodedLayout) -> Segment | None:
        """May this client's push start? (deduplication, the round's state). A gateway whose engine
        is a call away may also take the stream's slot in that call (None: ``_ingest`` takes one)."""
        self.dispatcher.begin_push(h.job, h.round, h.client_id)
        return None

    def _check_async(self, h: pb.PushHeader, aj: AsyncJob, enc: EncodedLayout) -> Segment | None:
        """Refuse at the header what acceptance would refuse now; like ``_begin``, it may bring the slot."""
        self.asyncs.check(aj, h.client_id, h.base_version)
        return None

    def _async_job(self, h: pb.PushHeader) -> AsyncJob | None:
        """The asynchronous job a push goes to, if its job is one (a node gateway asks the head)."""
        return self.asyncs.get(job_name(h.job))

    def _repeat(self, h: pb.PushHeader, it, enc: EncodedLayout, dup: Duplicate) -> pb.PushReply:
        """A push from a client whose update was accepted: read its bytes (no slot, nothing stored)
        and compare. Identical content is a retry whose reply was lost: success, ``duplicate``;
        anything else is ALREADY_EXISTS."""
        seen = Digest(h.num_examples, int(enc.encoding))
        self._receive(it, None, pb.PushRequest, "update", size=enc.total_size, digest=seen)
        if seen != dup.prior:
            raise LiflError("ALREADY_EXISTS", f"{dup.message}: this push's content differs from the accepted update")
        self.metrics.updates_duplicate.labels(job_name(h.job)).inc()
        return pb.PushReply(round=h.round, client_id=h.client_id, bytes_received=enc.total_size,
                            accepted=dup.accepted, duplicate=True)

    def _push_async(self, h: pb.PushHeader, aj: AsyncJob | None, it, encoding: Encoding) -> pb.PushReply:
        if aj is None:
            raise LiflError("INVALID_ARGUMENT", f"job {quote(job_name(h.job))} has no asynchronous job open; "
                                                "base_version is only for asynchronous jobs (push by round)")
        if not h.HasField("base_version"):
            raise needs_base_version(aj)
        enc = self._check_update_layout(h, aj.layout, f"asynchronous job {quote(aj.name)}", encoding)
        slot = self._check_async(h, aj, enc)
        t = self._ingest(it, enc, check=None, abandon=lambda: None,
                         accept=lambda slot: self.asyncs.accept(aj, h.client_id, h.base_version, h.num_examples,
                                                                slot), slot=slot)
        return pb.PushReply(client_id=h.client_id, bytes_received=aj.layout.total_size, accepted=t.position,
                            version=t.buffer, staleness=t.tau)

    @staticmethod
    def _check_update_layout(h: pb.PushHeader, want: Layout, where: str, encoding: Encoding) -> EncodedLayout:
        diff = specs_mismatch(h.tensors, want)
        if diff:
            raise LiflError("INVALID_ARGUMENT", f"{where}: {diff}")
        enc = encoded(want, encoding)
        if h.total_size != enc.total_size:
            raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {enc.total_size}, {enc.describe()}")
        return enc

    def _ingest(self, it, enc: EncodedLayout, check, accept, abandon, digest: Digest | None = None,
                slot: Segment | None = None):
        """Receive an update's chunks into a slot (``slot``, or one taken now; ``digest`` takes in
        each chunk) and hand it to ``accept``; on any failure ``abandon`` and give the slot back
        (nothing recorded)."""
        accepted = False
        try:
            if slot is None:
                try:
                    slot = self.arena.acquire_slot(enc.slot_size, timeout=self.config.admission_timeout_s)
                except BudgetExhausted as e:
                    raise LiflError("RESOURCE_EXHAUSTED", f"{e}; retry later", retry_after_s=0.5) from None
            self.metrics.slots_in_use.set(self.arena.stats().slots_in_use)
            slot.prefault()   # a fresh slot's pages in one call, not a fault per page as chunks land
            dst = slot.array(np.uint8, enc.total_size)
            if digest is None:   # an asynchronous delta: not deduplicated, but copied the same way
                digest = Digest(0.0, int(enc.encoding))
            checks, scan = self._scanner(enc, slot.buf)
            self._receive(it, dst, pb.PushRequest, "update", check=check, on_chunk=scan, digest=digest,
                          checks=checks)
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

    def _scanner(self, enc: EncodedLayout, buf) -> "tuple[ElementChecks | None, ChunkScan | None]":
        """The check each landed chunk gets: int8 block scales (always), NaN/Inf
        (``reject_nonfinite``) and the running Σx² for the L2 screen (``screen_l2_max``). Without
        the screen, the copy kernel checks each chunk in its own pass (``ElementChecks``); the
        screen's Σx² takes a pass of its own over each landed chunk (``ChunkScan``)."""
        nonfinite, screen = self.config.reject_nonfinite, self.config.screen_l2_max > 0
        if not screen and checks_while_copying():
            return enc.element_checks(nonfinite), None
        needed = nonfinite or screen or enc.encoding is Encoding.INT8_BLOCK256
        return None, (ChunkScan(enc, buf, nonfinite, screen) if needed else None)

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
                                   cancel=context.add_callback) as (run, seg):
            r = run.round
            header = pb.ModelHeader(round=r.id, total_size=r.layout.total_size, encoding=pb.ENCODING_RAW,
                                    total_weight=0.0 if initial else r.total_weight,
                                    num_updates=0 if initial else len(r.accepted))
            yield from self._send_model(header, r.layout, seg, context)

    def _pull_version(self, aj: AsyncJob, req: pb.PullRequest, wait: float, context):
        with self.asyncs.model(aj, None if req.latest else req.version, wait, cancel=context.add_callback) as (v, seg):
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
