"""Round lifecycle on a real server: all-expected, deadline with/without quorum, operator close/abort."""
import threading
import time

import grpc
import numpy as np
import pytest

from support import assert_matches, fedavg64, perturb, small_model
from lifl.client import Client, RpcFailure
from lifl.layout import Layout
from lifl.rounds import Round, State
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk

BASE = small_model()


def test_deadline_with_quorum_aggregates_what_arrived(clocked):
    server, clock = clocked()
    ups = [perturb(BASE, i) for i in range(3)]
    with Client(server.address) as c:
        rid = c.open_round(BASE, expected=5, quorum=3, deadline_s=0.6)
        for i, u in enumerate(ups):
            c.push(rid, u, i + 1, f"c{i}")
        clock.advance(0.5)
        server.tick()
        with pytest.raises(RpcFailure) as ei:
            c.pull(rid, wait_s=0)
        assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no result yet" in ei.value.message
        clock.advance(0.2)                        # past the deadline
        server.tick()
        got = c.pull(rid, wait_s=10)
        info = c.round_info(rid)
        with pytest.raises(RpcFailure) as ei:
            c.push(rid, ups[0], 1, "late")
        assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in ei.value.message
    assert info.state == "done" and "deadline passed with 3 of 5" in info.detail
    assert_matches(got, fedavg64(ups, [1, 2, 3]))


def test_deadline_below_quorum_fails_cleanly(clocked):
    server, clock = clocked()
    with Client(server.address) as c:
        rid = c.open_round(BASE, expected=4, quorum=3, deadline_s=0.4)
        c.push(rid, BASE, 1, "a")
        clock.advance(0.4)
        server.tick()
        with pytest.raises(RpcFailure) as ei:
            c.pull(rid, wait_s=10)
        assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "below the quorum of 3" in ei.value.message
        assert c.round_info(rid).state == "failed"
    # the fold already sent finishes in its own process and then frees the update's slot
    deadline = time.monotonic() + 10
    while server.arena.stats().slots_in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.arena.stats().slots_in_use == 0


def test_operator_close_and_abort(server):
    with Client(server.address) as c:
        r1 = c.open_round(BASE, expected=3, quorum=1)
        c.push(r1, perturb(BASE, 1), 2, "a")
        st = c.close_round(r1)
        assert st.state in ("aggregating", "done") and "closed by an operator" in st.detail
        assert_matches(c.pull(r1, wait_s=10), fedavg64([perturb(BASE, 1)], [2]))
        r2 = c.open_round(BASE, expected=3)
        c.push(r2, BASE, 1, "a")
        assert c.close_round(r2, abort=True).state == "failed"
        with pytest.raises(RpcFailure) as ei:
            c.close_round(r2)
        assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_stream_in_flight_at_deadline_is_told_why(clocked):
    server, clock = clocked()
    base = {"w": np.ones(1_000_000, np.float32)}
    lay = Layout.from_arrays(base)
    buf = bytearray(lay.total_size)
    lay.pack_into(base, buf)
    go, out = threading.Event(), {}
    with Client(server.address) as c:
        rid = c.open_round(base, expected=2, quorum=1, deadline_s=0.5)
        c.push(rid, base, 1, "fast")

        def slow():
            h = pb.PushHeader(round=rid, client_id="slow", num_examples=1, total_size=lay.total_size)
            lay.to_proto(h.tensors)
            yield pb.PushRequest(header=h).SerializeToString()
            yield encode_chunk(bytes(buf[:1 << 20]))
            go.wait(30)                            # the deadline passes while this stream is open
            yield encode_chunk(bytes(buf[1 << 20:]))

        def push():
            try:
                c.push_raw(slow())
            except RpcFailure as e:
                out["error"] = e
        t = threading.Thread(target=push)
        t.start()
        end = time.monotonic() + 20                # a real stream: wait (bounded) until it is in flight
        while c.round_info(rid).in_flight == 0 and time.monotonic() < end:
            time.sleep(0.02)
        clock.advance(0.6)
        server.tick()
        assert c.round_info(rid).state in ("aggregating", "done")
        go.set()
        t.join(30)
        e = out["error"]
        assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED and "closed while" in e.message
        got = c.pull(rid, wait_s=10)
    assert np.array_equal(got["w"], base["w"])


def test_pull_waits_for_the_result(server):
    with Client(server.address) as c:
        rid = c.open_round(BASE, expected=1)
        out = {}
        t = threading.Thread(target=lambda: out.update(c.pull(rid, wait_s=10)))
        t.start()
        time.sleep(0.3)
        assert t.is_alive()
        c.push(rid, BASE, 3, "a")
        t.join(10)
    assert_matches(out, fedavg64([BASE], [3]))


def test_state_machine_rules():
    lay = Layout.from_arrays({"a": np.zeros(1, np.float32)})
    r = Round("j", 1, lay, expected=2, quorum=1, deadline_s=10)
    r.begin("a")
    with pytest.raises(Exception, match="still being received"):
        r.begin("a")
    r.abandon("a")
    r.begin("a")
    r.accept("a", 1.0, 0.0)
    assert r.decide_close(r.opened_mono + 1) is None
    assert r.decide_close(r.opened_mono + 11) == State.AGGREGATING
    r.begin("b")
    with pytest.raises(Exception, match="all 2 expected"):
        r.begin("c")
    assert Round.check_params(3, 0, 0) == 3
