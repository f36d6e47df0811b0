"""Every refused push gets a specific status and message, and leaves the round's aggregate untouched."""
import threading
import time

import grpc
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
import numpy as np
import pytest

from support import expect, assert_matches, fedavg64, perturb, small_model
from lifl.client import Client, RpcFailure
from lifl.layout import Layout
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk

BASE = small_model()
LAYOUT = Layout.from_arrays(BASE)


def header(rid, client="x", n=1.0, total=None, layout=LAYOUT, job="default", **kw) -> bytes:
    h = pb.PushHeader(job=job, round=rid, client_id=client, num_examples=n,
                      total_size=layout.total_size if total is None else total, **kw)
    layout.to_proto(h.tensors)
    return pb.PushRequest(header=h).SerializeToString()


def body(arrays=BASE, layout=LAYOUT) -> bytes:
    buf = bytearray(layout.total_size)
    layout.pack_into(arrays, buf)
    return bytes(buf)


def wait_idle(srv, rid):
    with Client(srv.address) as c:
        for _ in range(200):
            info = c.round_info(rid)
            if not info.in_flight and srv.arena.stats().slots_in_use == 0:
                return
            time.sleep(0.02)
    raise AssertionError(f"in flight {info.in_flight}, slots {srv.arena.stats().slots_in_use}")


def test_each_rejection_is_specific_and_harmless(server):
    srv = server
    good = [perturb(BASE, i) for i in range(3)]
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=3)
        raw = body(good[0])
        # unknown round / wrong job
        expect(grpc.StatusCode.NOT_FOUND, "does not exist", c.push_raw, iter([header(999), raw]))
        expect(grpc.StatusCode.NOT_FOUND, "does not exist", c.push_raw, iter([header(rid, job="other"), raw]))
        # specs: names, shapes, dtypes
        for bad in ({**BASE, "extra": np.zeros(1, np.float32)},
                    {("renamed" if k == "head.bias" else k): v for k, v in BASE.items()},
                    {**BASE, "head.bias": np.zeros(11)},
                    {**BASE, "head.bias": BASE["head.bias"].astype(np.float32)}):
            expect(grpc.StatusCode.INVALID_ARGUMENT, f"round {rid}", c.push, rid, bad, 1, "x")
        # declared size wrong, short stream, extra bytes
        expect(grpc.StatusCode.INVALID_ARGUMENT, "total_size", c.push_raw,
               iter([header(rid, total=LAYOUT.total_size + 1), raw]))
        expect(grpc.StatusCode.INVALID_ARGUMENT, "stream ended after", c.push_raw,
               iter([header(rid), encode_chunk(raw[:1000])]))
        expect(grpc.StatusCode.INVALID_ARGUMENT, "more bytes than", c.push_raw,
               iter([header(rid), encode_chunk(raw), encode_chunk(b"\0" * 8)]))
        # weights
        for n in (0.0, -3.0, float("nan"), float("inf")):
            expect(grpc.StatusCode.INVALID_ARGUMENT, "num_examples", c.push_raw, iter([header(rid, n=n), raw]))
        # NaN / Inf values
        nan = {**good[0], "conv.weight": good[0]["conv.weight"].copy()}
        nan["conv.weight"].flat[7] = np.nan
        expect(grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf", c.push, rid, nan, 1, "x")
        # garbage and oversized headers, empty stream, chunk first
        expect(grpc.StatusCode.INVALID_ARGUMENT, "not a valid lifl.v1.PushRequest", c.push_raw,
               iter([b"\xff\xfe garbage \x00\x01"]))
        expect(grpc.StatusCode.INVALID_ARGUMENT, "limit is", c.push_raw, iter([b"\x0a" + b"\xff" * (2 << 20)]))
        expect(grpc.StatusCode.INVALID_ARGUMENT, "empty stream", c.push_raw, iter([]))
        expect(grpc.StatusCode.INVALID_ARGUMENT, "must be a PushHeader", c.push_raw, iter([encode_chunk(raw)]))
        expect(grpc.StatusCode.INVALID_ARGUMENT, "encoding", c.push_raw,
               iter([header(rid, encoding=5), raw]))
        # the round is untouched: nothing accepted, nothing held
        info = c.round_info(rid)
        assert (info.accepted, info.in_flight, info.total_weight) == (0, 0, 0.0)
        wait_idle(srv, rid)
        # duplicates
        c.push(rid, good[0], 2.0, "a")
        expect(grpc.StatusCode.ALREADY_EXISTS, "already accepted", c.push, rid, good[1], 9.0, "a")
        c.push(rid, good[1], 3.0, "b")
        c.push(rid, good[2], 4.0, "c")
        got = c.pull(rid, wait_s=20)
        # a closed round refuses more
        expect(grpc.StatusCode.FAILED_PRECONDITION, "takes no more updates", c.push, rid, good[0], 1, "d")
    assert_matches(got, fedavg64(good, [2.0, 3.0, 4.0]))
    rejected = srv.metrics.registry.get_sample_value
    assert rejected("lifl_updates_rejected_total", {"reason": "invalid_argument"}) >= 15
    assert rejected("lifl_updates_rejected_total", {"reason": "already_exists"}) == 1


def test_cancelled_stream_releases_its_slot_and_client_may_retry(server):
    base = {"w": np.ones(2_000_000, np.float32)}
    lay = Layout.from_arrays(base)
    raw = body(base, lay)
    gate = threading.Event()

    def slow():
        yield header(rid, client="slow", layout=lay)
        yield encode_chunk(raw[: 1 << 20])
        gate.wait(10)

    with Client(server.address) as c:
        rid = c.open_round(base, expected=1)
        ch = grpc.insecure_channel(server.address)
        call = ch.stream_unary("/lifl.v1.Aggregation/Push").future(slow())
        for _ in range(100):
            if c.round_info(rid).in_flight == 1:
                break
            time.sleep(0.02)
        assert c.round_info(rid).in_flight == 1
        call.cancel()
        gate.set()
        wait_idle(server, rid)
        assert c.round_info(rid).accepted == 0
        c.push(rid, base, 1, "slow")  # a retry after a failed stream is welcome
        got = c.pull(rid, wait_s=10)
        ch.close()
    assert np.array_equal(got["w"], base["w"])


def test_budget_full_gives_resource_exhausted_with_retry_hint(make_server):
    srv = make_server(shm_budget_mb=4, admission_timeout_s=0.0)
    base = {"w": np.ones(600_000, np.float32)}  # 2.4 MB: one slot fits the 4 MiB budget, two do not
    lay = Layout.from_arrays(base)
    raw = body(base, lay)
    gate = threading.Event()

    def held():
        yield header(rid, client="first", layout=lay)
        yield encode_chunk(raw[:1000])
        gate.wait(10)
        yield encode_chunk(raw[1000:])

    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(base, expected=2)
        ch = grpc.insecure_channel(srv.address)
        fut = ch.stream_unary("/lifl.v1.Aggregation/Push").future(held())
        for _ in range(100):
            if srv.arena.stats().slots_in_use == 1:
                break
            time.sleep(0.02)
        try:
            c._push(iter([header(rid, client="second", layout=lay), encode_chunk(raw)]))
            raise AssertionError("expected RESOURCE_EXHAUSTED")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "slot budget full" in e.details()
            trailers = dict(e.trailing_metadata())
            assert trailers["retry-after-ms"] == "500"
            # the standard form too: google.rpc.Status carrying a RetryInfo, matching the status
            status = Status.FromString(trailers["grpc-status-details-bin"])
            assert (status.code, status.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], e.details())
            info = RetryInfo()
            assert len(status.details) == 1 and status.details[0].Unpack(info)
            assert info.retry_delay.ToMilliseconds() == 500
        gate.set()
        fut.result(timeout=10)
        ch.close()
        # the Python client retries by itself once the budget frees up
        with Client(srv.address, retry_s=10) as c2:
            c2.push(rid, base, 1, "second")
        got = c.pull(rid, wait_s=10)
    assert np.array_equal(got["w"], base["w"])


def test_tokens(make_server):
    srv = make_server(tokens=["client-secret"], admin_token="admin-secret")
    with Client(srv.address) as anon, Client(srv.address, token="client-secret") as cl, \
            Client(srv.address, token="admin-secret") as adm, Client(srv.address, token="nope") as bad:
        expect(grpc.StatusCode.UNAUTHENTICATED, "missing", anon.open_round, BASE, expected=1)
        expect(grpc.StatusCode.UNAUTHENTICATED, "unknown token", bad.open_round, BASE, expected=1)
        expect(grpc.StatusCode.PERMISSION_DENIED, "not administer", cl.open_round, BASE, expected=1)
        rid = adm.open_round(BASE, expected=1)
        expect(grpc.StatusCode.UNAUTHENTICATED, "missing", anon.push, rid, BASE, 1, "a")
        cl.push(rid, BASE, 1, "a")
        cl.pull(rid, wait_s=10)
        assert cl.round_info(rid).state == "done"


def test_open_round_rejects_bad_parameters(server):
    with Client(server.address) as c:
        expect(grpc.StatusCode.INVALID_ARGUMENT, "expected clients", c.open_round, BASE, expected=0)
        expect(grpc.StatusCode.INVALID_ARGUMENT, "quorum", c.open_round, BASE, expected=2, quorum=3)
        expect(grpc.StatusCode.INVALID_ARGUMENT, "deadline", c.open_round, BASE, expected=2, deadline_s=-1)
        expect(grpc.StatusCode.NOT_FOUND, "does not exist", c.open_round, from_round=77, expected=1)
        h = pb.OpenRoundHeader(expected=1)
        for _ in range(2):
            h.tensors.add(name="dup", dtype="float32", shape=[2])
        with pytest.raises(grpc.RpcError) as ei:
            c._open(iter([pb.OpenRoundRequest(header=h).SerializeToString()]))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "appears twice" in ei.value.details()
    assert server.snapshot().rounds == ()
