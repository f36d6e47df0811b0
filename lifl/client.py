"""Python client for LIFL's gRPC service.

    with Client("127.0.0.1:50051") as c:
        rid = c.open_round(initial_arrays, expected=10)
        c.push(rid, arrays, num_examples=128, client_id="phone-7")
        global_arrays = c.pull(rid, wait_s=60)

    # asynchronous (FedBuff) job: no rounds; push deltas on a version, pull versions
        c.open_async(initial_arrays, AsyncSpec(buffer_size=10), job="jobA")
        v, model = c.pull_version("latest", job="jobA")
        c.push(0, delta_arrays, num_examples=128, client_id="phone-7", job="jobA", base_version=v)

Updates stream as the flat layout in ``chunk_size`` pieces straight from the
arrays (no whole-model copy). A push is retried for up to ``retry_s`` only when the
server said a retry may succeed (:func:`retryable`): RESOURCE_EXHAUSTED with its
``retry-after-ms`` hint (slot budget full) or from grpcio's call limit
(``max_concurrent_rpcs``), UNAVAILABLE, and ABORTED (another stream of the same
client is still being received: once it ends, this push is either taken or
answered as a duplicate). Everything else raises :class:`RpcFailure` at once with
the gRPC status and message. Pushing the same update again (e.g. after a timeout)
is safe: an identical repeat of an accepted update succeeds with
``Receipt.duplicate`` and is not folded twice (docs/clients.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Mapping

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

# the server's finalize (integers rounded to nearest, bools the weighted majority with ties False),
# public here for code that averages on its own side and must agree with LIFL bit for bit
from .fold import finalize_arrays  # noqa: F401
from . import encoding as encodings
from .async_proto import optimizer_to_proto, spec_to_proto
from .engine.buffered import AsyncSpec
from .engine.optimizers import ServerOptimizer
from .layout import Layout
from .rounds import State
from .v1 import aggregation_pb2 as pb
from .wire import chunk_payload, encode_chunk

MiB = 2**20


class RpcFailure(Exception):
    """A call LIFL refused or could not complete. ``code`` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class Receipt:
    round: int
    client_id: str
    bytes_received: int
    accepted: int
    version: int = 0        # asynchronous jobs: the version this update's buffer publishes
    staleness: int = 0      # asynchronous jobs: versions published since its base
    duplicate: bool = False  # this push repeated an accepted update with identical content (not folded again)


@dataclass(frozen=True)
class RoundStatus:
    job: str
    round: int
    state: str
    expected: int
    quorum: int
    accepted: int
    in_flight: int
    total_weight: float
    detail: str
    post_arrival_seconds: float
    mode: str = "sync"
    version: int = 0         # asynchronous jobs: newest published version
    buffer_fill: int = 0
    buffer_size: int = 0
    refused_stale: int = 0

    @classmethod
    def from_proto(cls, r: pb.RoundInfo) -> "RoundStatus":
        state = State(r.state).name.lower() if r.state else "unknown"
        mode = "async" if r.mode == pb.JOB_MODE_ASYNC else "sync"
        return cls(r.job, r.round, state, r.expected, r.quorum, r.accepted, r.in_flight, r.total_weight,
                   r.detail, r.post_arrival_seconds, mode, r.version, r.buffer_fill, r.buffer_size,
                   r.refused_stale)


def _failure(e: grpc.RpcError) -> RpcFailure:
    return RpcFailure(e.code(), e.details() or "")


def _retry_after(e: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds: ``google.rpc.RetryInfo`` in the rich-status trailer,
    else our ``retry-after-ms``; None when it sent neither (or they do not parse)."""
    trailers = dict(e.trailing_metadata() or ())
    raw = trailers.get("grpc-status-details-bin")
    if raw:
        try:
            for detail in Status.FromString(raw).details:
                if detail.Is(RetryInfo.DESCRIPTOR):
                    info = RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        except DecodeError:
            pass
    try:
        return int(trailers["retry-after-ms"]) / 1000
    except (KeyError, ValueError):
        return None


#: grpcio's own refusal when a server's maximum_concurrent_rpcs is reached (no trailers of ours)
_CALL_LIMIT = "Concurrent RPC limit exceeded!"


def retryable(e: grpc.RpcError) -> float | None:
    """Seconds to wait before a retry that may succeed, or None: do not retry.

    RESOURCE_EXHAUSTED is retried only when the server meant "busy" — its ``retry-after-ms``
    trailer, or grpcio's call limit — never the client's own "received metadata size exceeds
    hard limit", which no retry can fix."""
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return 0.5
    if code == grpc.StatusCode.ABORTED:     # our own stream of this update is still being received
        return 0.2
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        hint = _retry_after(e)
        if hint is not None:
            return hint
        if (e.details() or "") == _CALL_LIMIT:
            return 0.2
    return None


class Client:
    def __init__(self, address: str, token: str | None = None, root_cert: bytes | None = None,
                 chunk_size: int = 2 * MiB, retry_s: float = 60.0, timeout_s: float | None = None,
                 client_cert: bytes | None = None, client_key: bytes | None = None, channel_options=()):
        """``root_cert``: PEM CA that signed the server's certificate (TLS); ``client_cert`` and
        ``client_key``: this client's PEM certificate and key, for servers that require mutual TLS.
        ``channel_options``: more gRPC channel options, e.g. ``("grpc.use_local_subchannel_pool", 1)``
        for a connection of this client's own (channels in one process otherwise share one)."""
        if not MiB // 4 <= chunk_size <= 8 * MiB:
            raise ValueError("chunk_size must be between 256 KiB and 8 MiB")
        if bool(client_cert) != bool(client_key):
            raise ValueError("client_cert and client_key go together")
        opts = [("grpc.max_receive_message_length", 16 * MiB), ("grpc.max_send_message_length", 16 * MiB),
                *channel_options]
        if root_cert or client_cert:
            creds = grpc.ssl_channel_credentials(root_cert, client_key, client_cert)
            self._channel = grpc.secure_channel(address, creds, opts)
        else:
            self._channel = grpc.insecure_channel(address, opts)
        self._md = (("authorization", f"Bearer {token}"),) if token else ()
        self.chunk_size, self.retry_s, self.timeout_s = chunk_size, retry_s, timeout_s
        ch = self._channel
        self._push = ch.stream_unary("/lifl.v1.Aggregation/Push", response_deserializer=pb.PushReply.FromString)
        self._pull = ch.unary_stream("/lifl.v1.Aggregation/Pull", request_serializer=pb.PullRequest.SerializeToString)
        self._get = ch.unary_unary("/lifl.v1.Aggregation/GetRound",
                                   request_serializer=pb.GetRoundRequest.SerializeToString,
                                   response_deserializer=pb.RoundInfo.FromString)
        self._open = ch.stream_unary("/lifl.v1.Admin/OpenRound", response_deserializer=pb.RoundInfo.FromString)
        self._close = ch.unary_unary("/lifl.v1.Admin/CloseRound",
                                     request_serializer=pb.CloseRoundRequest.SerializeToString,
                                     response_deserializer=pb.RoundInfo.FromString)
        self._status = ch.unary_unary("/lifl.v1.Admin/Status", request_serializer=pb.StatusRequest.SerializeToString,
                                      response_deserializer=pb.StatusReply.FromString)

    # -- streams -------------------------------------------------------------------
    def _stream(self, header_msg: bytes, layout: Layout | None, arrays, encoded=None) -> Iterator[bytes]:
        yield header_msg
        if encoded is not None:
            for piece in encodings.chunks(*encoded, self.chunk_size):
                yield encode_chunk(piece)
        elif layout is not None:
            for piece in layout.chunks(arrays, self.chunk_size):
                yield encode_chunk(piece)

    def push(self, round: int, arrays: Mapping[str, np.ndarray], num_examples: float, client_id: str,
             job: str = "default", encoding: "str | int" = "raw", base_version: int | None = None) -> Receipt:
        """Stream one update; returns once the server has accepted it (not yet folded).

        ``encoding`` (``raw``, ``float16``, ``bfloat16``, ``int8``: ``lifl.encoding``) compresses the
        float32/float64 tensors on the wire and in the server's memory; ValueError if a tensor
        cannot be encoded (NaN/Inf, or beyond float16's range). Asynchronous jobs: ``arrays`` is a
        delta against ``base_version`` (``round`` is ignored)."""
        layout = Layout.from_arrays(arrays)
        enc = encodings.encoded(layout, encodings.parse(encoding))
        header = pb.PushHeader(job=job, round=round, client_id=client_id, num_examples=float(num_examples),
                               total_size=enc.total_size, encoding=int(enc.encoding), base_version=base_version)
        layout.to_proto(header.tensors)
        first = pb.PushRequest(header=header).SerializeToString()
        # encoded once (a retry re-sends the same bytes); refuses what cannot be encoded before sending
        pieces = None if enc.encoding is encodings.Encoding.RAW else (enc, encodings.encode_pieces(enc, arrays))
        give_up = time.monotonic() + self.retry_s
        while True:
            try:
                r = self._push(self._stream(first, layout, arrays, pieces), metadata=self._md, timeout=self.timeout_s)
                return Receipt(r.round, r.client_id, r.bytes_received, r.accepted, r.version, r.staleness,
                               r.duplicate)
            except grpc.RpcError as e:
                wait = retryable(e)
                if wait is not None and time.monotonic() + wait < give_up:
                    time.sleep(wait)
                    continue
                raise _failure(e) from None

    def push_raw(self, messages: Iterator[bytes]) -> Receipt:
        """Send pre-serialized PushRequest messages as they are (for tests and other tools)."""
        try:
            r = self._push(messages, metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _failure(e) from None
        return Receipt(r.round, r.client_id, r.bytes_received, r.accepted, duplicate=r.duplicate)

    def pull(self, round: int, wait_s: float = 0.0, initial: bool = False, job: str = "default"
             ) -> dict[str, np.ndarray]:
        """The round's aggregate (or the model it was opened with), as arrays over one buffer."""
        req = pb.PullRequest(job=job, round=round, wait_seconds=wait_s,
                             kind=pb.MODEL_KIND_INITIAL if initial else pb.MODEL_KIND_RESULT)
        return self._pull_model(req)[1]

    def pull_version(self, version: int | str = "latest", job: str = "default", wait_s: float = 0.0
                     ) -> tuple[int, dict[str, np.ndarray]]:
        """An asynchronous job's model: ``"latest"`` or a kept version number (waiting up to
        ``wait_s`` for one not yet published); returns (version, arrays)."""
        if version == "latest":
            req = pb.PullRequest(job=job, latest=True)
        elif isinstance(version, int) and version >= 0:
            req = pb.PullRequest(job=job, version=version, wait_seconds=wait_s)
        else:
            raise ValueError(f"version must be 'latest' or a version number >= 0, got {version!r}")
        head, arrays = self._pull_model(req)
        return head.version, arrays

    def _pull_model(self, req: pb.PullRequest) -> tuple[pb.ModelHeader, dict[str, np.ndarray]]:
        timeout = None if self.timeout_s is None else self.timeout_s + req.wait_seconds
        try:
            stream = self._pull(req, metadata=self._md, timeout=timeout)
            head = pb.PullChunk.FromString(next(stream)).header
            layout = Layout.from_proto(head.tensors)
            buf = bytearray(layout.total_size)
            pos = 0
            for raw in stream:
                piece = chunk_payload(raw, pb.PullChunk, "model chunk")
                buf[pos:pos + len(piece)] = piece
                pos += len(piece)
        except grpc.RpcError as e:
            raise _failure(e) from None
        if pos != layout.total_size:
            raise RpcFailure(grpc.StatusCode.DATA_LOSS, f"model stream ended after {pos} of {layout.total_size} bytes")
        return head, layout.views(buf)

    # -- rounds ------------------------------------------------------------------------
    def open_round(self, model: Mapping[str, np.ndarray] | None = None, expected: int = 1, quorum: int = 0,
                   deadline_s: float = 0.0, job: str = "default", from_round: int = 0,
                   layout: Layout | None = None, optimizer: ServerOptimizer | None = None) -> int:
        """Open a round; the model (or ``layout`` alone, or ``from_round``'s result) fixes its tensor specs.

        ``optimizer``: a server optimizer applied at finalize (default: the plain weighted mean)."""
        h = pb.OpenRoundHeader(job=job, expected=expected, quorum=quorum, deadline_seconds=deadline_s,
                               from_round=from_round, encoding=pb.ENCODING_RAW)
        if optimizer is not None:
            optimizer_to_proto(optimizer.validate(), h.optimizer)
        return self._open_with(h, model, layout).round

    def open_async(self, model: Mapping[str, np.ndarray], spec: AsyncSpec | None = None,
                   job: str = "default") -> RoundStatus:
        """Open an asynchronous (FedBuff) job at version 0 = ``model``; see docs/async.md."""
        h = pb.OpenRoundHeader(job=job, mode=pb.JOB_MODE_ASYNC, encoding=pb.ENCODING_RAW)
        spec_to_proto((spec or AsyncSpec()).validate(), h.async_options, h.optimizer)
        return RoundStatus.from_proto(self._open_with(h, model, None))

    def _open_with(self, h: pb.OpenRoundHeader, model, layout: Layout | None) -> pb.RoundInfo:
        lay = None
        if model is not None:
            lay = Layout.from_arrays(model)
            lay.to_proto(h.tensors)
            h.total_size = lay.total_size
        elif layout is not None:
            layout.to_proto(h.tensors)
        first = pb.OpenRoundRequest(header=h).SerializeToString()
        try:
            return self._open(self._stream(first, lay, model), metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _failure(e) from None

    def close_round(self, round: int, abort: bool = False, job: str = "default") -> RoundStatus:
        return RoundStatus.from_proto(self._call(self._close, pb.CloseRoundRequest(job=job, round=round, abort=abort)))

    def close_job(self, job: str = "default") -> RoundStatus:
        """Close an asynchronous job: its open buffer is discarded, its memory given back."""
        return self.close_round(0, job=job)

    def job_info(self, job: str = "default") -> RoundStatus:
        """An asynchronous job's state: version, buffer fill, updates accepted and refused."""
        return self.round_info(0, job=job)

    def round_info(self, round: int, job: str = "default") -> RoundStatus:
        return RoundStatus.from_proto(self._call(self._get, pb.GetRoundRequest(job=job, round=round)))

    def status(self) -> pb.StatusReply:
        return self._call(self._status, pb.StatusRequest())

    def _call(self, fn, req):
        try:
            return fn(req, metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _failure(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
