"""Limits: the per-client token bucket (pure, with an injected clock, then on a real server), keep-alive
enforcement and connection age (real gRPC connections), and the header and update size bounds."""
import time

import grpc
import numpy as np
import pytest

from support import expect, metric, small_model
from lifl import tokens
from lifl.client import Client, retryable
from lifl.engine.clock import ManualClock
from lifl.layout import Layout
from lifl.ratelimit import RateLimiter, TokenBucket
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk

BASE = small_model()
LAYOUT = Layout.from_arrays(BASE)


def test_token_bucket():
    b = TokenBucket(rate=2.0, burst=3)
    assert [b.take(0.0) for _ in range(3)] == [None, None, None]     # a full bucket: the burst
    assert b.take(0.0) == pytest.approx(0.5)                            # empty: one call refills in 1/rate
    assert b.take(0.25) == pytest.approx(0.25)                          # half refilled: a quarter second to go
    assert b.take(0.5) is None
    assert b.take(100.0) is None and b.level == pytest.approx(2.0)      # refills up to the burst, no further
    assert b.take(99.0) is None                                         # a clock that steps back adds nothing


def test_rate_limiter_keys_and_bounded_memory():
    clock = ManualClock()
    lim = RateLimiter(rate=1.0, burst=2, clock=clock, max_keys=3)
    assert [lim.take("a"), lim.take("a"), lim.take("b")] == [None, None, None]
    assert lim.take("a") == pytest.approx(1.0)                          # a bucket each: a is empty, b is not
    clock.advance(1.0)                                                  # b is full again, a holds one call
    lim.take("c")
    lim.take("d")                                                       # a fourth identity: one must go
    assert len(lim) == 3
    # the full bucket (b) was forgotten, not a's: a still has one call, then waits
    assert lim.take("a") is None and lim.take("a") == pytest.approx(1.0)
    for k in "efghij":                                                  # a flood of identities stays bounded
        lim.take(k)
    assert len(lim) == 3


def _keypair(tmp_path):
    tokens.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    return (tmp_path / "k.pem").read_bytes(), str(tmp_path / "k.pub")


def test_rate_limit_per_client_on_a_real_server(clocked, tmp_path):
    key, pub = _keypair(tmp_path)
    srv, clock = clocked(rate_limit_per_s=2.0, rate_limit_burst=2, token_key=pub)
    op_tok = tokens.issue(key, "ops", "*", "operator")
    a_tok, b_tok = tokens.issue(key, "a", "default"), tokens.issue(key, "b", "default")
    with Client(srv.address, token=op_tok) as op:
        rid = op.open_round(BASE, expected=2)
    with Client(srv.address, token=a_tok, retry_s=0) as a, Client(srv.address, token=b_tok, retry_s=0) as b:
        a.round_info(rid)
        a.round_info(rid)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in 0.500 s", a.push, rid, BASE, 1, "a")
        b.push(rid, BASE, 1, "b")                                       # b has its own bucket
        # the status carries the wait as retry-after-ms, which the client's retry honours
        with grpc.insecure_channel(srv.address) as ch:
            get = ch.unary_unary("/lifl.v1.Aggregation/GetRound",
                                 request_serializer=pb.GetRoundRequest.SerializeToString)
            with pytest.raises(grpc.RpcError) as ei:
                get(pb.GetRoundRequest(round=rid), metadata=(("authorization", f"Bearer {a_tok}"),))
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retryable(ei.value) == pytest.approx(0.5)
        with Client(srv.address, token=op_tok) as op:
            info = op.round_info(rid)
            assert (info.accepted, info.in_flight) == (1, 0)            # the refused push stored nothing
        clock.advance(0.5)
        a.push(rid, BASE, 1, "a")
        clock.advance(0.5)
        assert a.pull(rid, wait_s=30)["conv.weight"].shape == BASE["conv.weight"].shape
    assert metric(srv, "lifl_auth_refused_total", reason="rate") == 2
    assert metric(srv, "lifl_updates_rejected_total", reason="resource_exhausted") == 1
    assert srv.arena.stats().slots_in_use == 0


def _waiting_pull(address, rid, options=()):
    """A Pull that waits for a result that will not come: it ends only when the connection does."""
    t = time.monotonic()
    with grpc.insecure_channel(address, list(options)) as ch:
        pull = ch.unary_stream("/lifl.v1.Aggregation/Pull", request_serializer=pb.PullRequest.SerializeToString)
        with pytest.raises(grpc.RpcError) as ei:
            list(pull(pb.PullRequest(round=rid, wait_seconds=20), timeout=20))
    return ei.value, time.monotonic() - t


def test_a_client_pinging_too_often_is_disconnected(make_server):
    srv = make_server(keepalive_min_ping_interval_s=10, keepalive_max_ping_strikes=1)
    with Client(srv.address) as c:
        rid = c.open_round(BASE, expected=1)
    err, took = _waiting_pull(srv.address, rid, [("grpc.keepalive_time_ms", 10),
                                                  ("grpc.keepalive_permit_without_calls", 1),
                                                  ("grpc.http2.max_pings_without_data", 0)])
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "Too many pings" in err.details(), err
    assert took < 15


def test_connections_older_than_max_connection_age_are_closed(make_server):
    srv = make_server(max_connection_age_s=0.3, max_connection_age_grace_s=0.3)
    with Client(srv.address) as c:
        rid = c.open_round(BASE, expected=1)
    err, took = _waiting_pull(srv.address, rid)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "max connection age" in err.details(), err
    assert took < 15
    with Client(srv.address) as c:                                      # a new connection is served
        assert c.round_info(rid).state == "open"


def test_header_and_update_size_bounds(make_server):
    srv = make_server(header_limit_bytes=4096)
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=1)
        h = pb.PushHeader(round=rid, client_id="x" * 5000, num_examples=1, total_size=LAYOUT.total_size)
        LAYOUT.to_proto(h.tensors)
        raw = bytearray(LAYOUT.total_size)
        LAYOUT.pack_into(BASE, raw)
        expect(grpc.StatusCode.INVALID_ARGUMENT, "header_limit_bytes", c.push_raw,
               iter([pb.PushRequest(header=h).SerializeToString(), encode_chunk(bytes(raw))]))
        h.client_id = "x"
        first = pb.PushRequest(header=h).SerializeToString()
        expect(grpc.StatusCode.INVALID_ARGUMENT, "more bytes than the declared total_size", c.push_raw,
               iter([first, encode_chunk(bytes(raw)), encode_chunk(b"\0" * 64)]))      # over the round's model
        big = encode_chunk(bytes(srv.config.max_chunk_bytes + 4096 + 1))              # over grpc's message limit
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max", c.push_raw, iter([first, big]))
        info = c.round_info(rid)
        assert (info.accepted, info.in_flight) == (0, 0)
        c.push(rid, BASE, 1, "x")
        assert c.round_info(rid).accepted == 1
        c.pull(rid, wait_s=30)
    assert srv.arena.stats().slots_in_use == 0
