"""Hypothesis strategies for hostile requests, and one raw gRPC call that reports only its status.

Shared by tests/test_fuzz.py (bounded, in CI) and benchmarks/fuzz_server.py (a long run)."""
from __future__ import annotations

import grpc
from hypothesis import strategies as st

from lifl.layout import SUPPORTED_DTYPES
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk

METHODS = {  # path -> (client streaming, server streaming)
    "/lifl.v1.Aggregation/Push": (True, False),
    "/lifl.v1.Aggregation/Pull": (False, True),
    "/lifl.v1.Aggregation/GetRound": (False, False),
    "/lifl.v1.Admin/OpenRound": (True, False),
    "/lifl.v1.Admin/CloseRound": (False, False),
    "/lifl.v1.Admin/Status": (False, False),
}
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)  # what no malformed request may get

texts = st.one_of(st.just(""), st.just("default"), st.text(max_size=24), st.text(min_size=200, max_size=3000))
u64 = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1))
i64 = st.one_of(st.integers(-3, 64), st.integers(-(2**63), 2**63 - 1))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1e308, -1.0]))
encodings = st.one_of(st.sampled_from([0, 1, 2, 99, -1]), st.integers(-(2**31), 2**31 - 1))


@st.composite
def tensor_specs(draw, into):
    for _ in range(draw(st.integers(0, 4))):
        t = into.add()
        t.name = draw(st.one_of(st.sampled_from(["w", "b", "w"]), texts))
        t.dtype = draw(st.one_of(st.sampled_from(SUPPORTED_DTYPES), texts))
        t.shape.extend(draw(st.lists(i64, max_size=draw(st.sampled_from([3, 40])))))
    return into


@st.composite
def push_streams(draw):
    h = pb.PushHeader(job=draw(texts), round=draw(u64), client_id=draw(texts), num_examples=draw(floats),
                      total_size=draw(u64), encoding=draw(encodings))
    draw(tensor_specs(h.tensors))
    return [pb.PushRequest(header=h).SerializeToString()] + draw(chunks())


@st.composite
def open_streams(draw):
    h = pb.OpenRoundHeader(job=draw(texts), total_size=draw(u64), expected=draw(st.integers(0, 2**32 - 1)),
                           quorum=draw(st.integers(0, 2**32 - 1)), deadline_seconds=draw(floats),
                           from_round=draw(st.one_of(st.just(0), u64)), encoding=draw(encodings))
    draw(tensor_specs(h.tensors))
    return [pb.OpenRoundRequest(header=h).SerializeToString()] + draw(chunks())


def chunks():
    one = st.one_of(st.binary(max_size=64).map(encode_chunk), st.binary(max_size=64),
                    st.just(pb.PushRequest(header=pb.PushHeader()).SerializeToString()))
    return st.lists(one, max_size=3)


def unary_requests(path: str):
    if path.endswith("Pull"):
        msg = st.builds(lambda j, r, k, w: pb.PullRequest(job=j, round=r, kind=k, wait_seconds=w).SerializeToString(),
                        texts, u64, encodings, st.one_of(st.just(0.0), st.floats(max_value=0.05), floats))
    elif path.endswith("GetRound"):
        msg = st.builds(lambda j, r: pb.GetRoundRequest(job=j, round=r).SerializeToString(), texts, u64)
    elif path.endswith("CloseRound"):
        msg = st.builds(lambda j, r, a: pb.CloseRoundRequest(job=j, round=r, abort=a).SerializeToString(),
                        texts, u64, st.booleans())
    else:
        msg = st.just(b"")
    return st.one_of(msg, st.binary(max_size=64), st.binary(max_size=8).map(lambda b: b"\xff" + b))


def requests_for(path: str):
    if path.endswith("/Push"):
        return st.one_of(push_streams(), st.lists(st.binary(max_size=64), max_size=3))
    if path.endswith("/OpenRound"):
        return st.one_of(open_streams(), st.lists(st.binary(max_size=64), max_size=3))
    return unary_requests(path)


def call(channel: grpc.Channel, path: str, request, timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
    """Send raw bytes (a list of messages for a client stream); the status and message that came back.
    A Pull whose wait outlives ``timeout`` ends DEADLINE_EXCEEDED on the client's side."""
    client_stream, server_stream = METHODS[path]
    make = {(True, False): channel.stream_unary, (False, True): channel.unary_stream,
            (False, False): channel.unary_unary}[(client_stream, server_stream)]
    fn = make(path)
    try:
        r = fn(iter(request) if client_stream else request, timeout=timeout)
        if server_stream:
            for _ in r:
                pass
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""
