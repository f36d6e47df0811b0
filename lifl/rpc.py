"""What every LIFL gRPC service shares: requests parsed from bytes, refusals turned into specific
statuses (with a logged id for the unexpected), streams' first message and chunks, and the
replies that describe rounds. ``gateway`` (Aggregation) and ``admin`` (Admin) build on it."""
from __future__ import annotations

import logging
import os

import grpc
import numpy as np
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from .auth import Refusal
from .async_jobs import AsyncJob
from .errors import LiflError, quote
from .encoding import Encoding
from .encoding import parse as parse_encoding
from .layout import Layout, LayoutError
from .rounds import State
from .v1 import aggregation_pb2 as pb
from .wire import chunk_payload, parse

MAX_MESSAGE_CHARS = 1024   # status messages travel in trailers, which clients cap at 8–16 KiB

log = logging.getLogger("lifl.rpc")


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


def specs_mismatch(tensors, want: Layout) -> str | None:
    """How a push header's tensor specs differ from the model's (None: they match). The specs of
    a matching header are compared as they are, field by field (ResNet-18's 122: ~0.1 ms); only
    a header that differs is built into a :class:`Layout` (~0.4 ms), to say how."""
    if len(tensors) == len(want.specs) and all(
            t.name == s.name and t.dtype == s.dtype and tuple(t.shape) == s.shape for t, s in zip(tensors, want.specs)):
        return None
    return _spec_mismatch(layout_of(tensors), want)


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



class Service:
    """Plumbing of a servicer: handlers wrap each method so that anything it raises becomes a
    status a client can act on (``refusal``), and read headers and chunks with their limits."""

    def __init__(self, config, arena, dispatcher, metrics):
        self.config, self.arena, self.dispatcher, self.metrics = config, arena, dispatcher, metrics

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

    def _receive(self, it, dst: np.ndarray | None, cls, what: str, check=None, on_chunk=None, size: int = 0,
                 digest=None, checks=None) -> int:
        """Copy the chunks that follow a header into dst; return the byte count (must equal dst's
        size). ``digest`` (``rounds.Digest``) takes in every chunk; with ``dst`` None the bytes are
        only counted against ``size`` and digested (a duplicate's, which is not stored).
        ``checks`` (``encoding.ElementChecks``, with ``digest``): checked in the same pass."""
        size, pos = (dst.nbytes if dst is not None else size), 0
        for raw in it:
            payload = chunk_payload(raw, cls, what)
            n = len(payload)
            if pos + n > size:
                raise LiflError("INVALID_ARGUMENT",
                                f"{what}: received more bytes than the declared total_size of {size}")
            if digest is not None:   # copied, hashed and checked in one pass
                region, bad = digest.update(payload, dst, checks)
                if region >= 0:
                    raise LiflError("INVALID_ARGUMENT", checks.why(region, bad))
            elif dst is not None:
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
