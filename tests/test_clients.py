"""Client behaviours against a real server on loopback (docs/clients.md): a client that disconnects
mid-stream, a retry after a timeout or a lost reply (idempotent for the same client and content), a
straggler after the deadline, and one client on two concurrent streams. Each checks what was stored
(round info, slots in use) and that the result is exactly the float64 FedAvg of what was taken."""
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from support import assert_matches, expect, fedavg64, perturb, small_model
from lifl.client import Client, RpcFailure
from lifl.layout import Layout
from lifl.rounds import Digest, Duplicate, Round
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk

BASE = small_model()
BIG = {"w": np.linspace(-1, 1, 1_000_000, dtype=np.float32)}   # 4 MB: a stream that can be held mid-way


def header(rid, client, layout, n=1.0) -> bytes:
    h = pb.PushHeader(round=rid, client_id=client, num_examples=n, total_size=layout.total_size)
    layout.to_proto(h.tensors)
    return pb.PushRequest(header=h).SerializeToString()


def body(arrays) -> bytes:
    lay = Layout.from_arrays(arrays)
    buf = bytearray(lay.total_size)
    lay.pack_into(arrays, buf)
    return bytes(buf)


def held_stream(rid, client, arrays, gate: threading.Event, n=1.0):
    """A push that sends its header and first MiB, then waits for ``gate`` before the rest."""
    lay, raw = Layout.from_arrays(arrays), body(arrays)
    yield header(rid, client, lay, n)
    yield encode_chunk(raw[:1 << 20])
    gate.wait(30)
    yield encode_chunk(raw[1 << 20:])


def wait_for(cond, what: str, timeout=20.0):
    """Poll a real server (bounded) until ``cond()``."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def nothing_held(srv, c, rid, accepted):
    info = c.round_info(rid)
    return info.in_flight == 0 and info.accepted == accepted and srv.arena.stats().slots_in_use == 0


# -- the pure rules --------------------------------------------------------------------------------
def test_round_rules_for_repeats_concurrency_and_stragglers():
    lay = Layout.from_arrays({"a": np.zeros(4, np.float32)})
    r = Round("j", 1, lay, expected=3, quorum=1, deadline_s=10, opened_mono=100.0)
    r.begin("a", now=101.0)
    with pytest.raises(Exception) as ei:             # a second stream of the same client
        r.begin("a", now=101.0)
    assert ei.value.code == "ABORTED" and "still being received" in ei.value.message
    d = Digest(2.0, 0)
    d.update(b"\x00" * 16)
    r.accept("a", 2.0, 102.0, d)
    with pytest.raises(Duplicate) as dup:            # a repeat carries the accepted update's digest
        r.begin("a", now=103.0)
    assert dup.value.code == "ALREADY_EXISTS" and dup.value.prior == d
    same, other = Digest(2.0, 0), Digest(3.0, 0)
    same.update(b"\x00" * 16)
    other.update(b"\x00" * 16)
    assert same == d and other != d                  # the weight is part of the content
    r.begin("b", now=109.9)
    with pytest.raises(Exception) as late:           # past the deadline, not yet closed by the loop
        r.begin("c", now=110.0)
    assert late.value.code == "DEADLINE_EXCEEDED"
    with pytest.raises(Exception) as late:
        r.accept("b", 1.0, 110.5)
    assert late.value.code == "DEADLINE_EXCEEDED" and set(r.accepted) == {"a"}


# -- 1. disconnect mid-stream ----------------------------------------------------------------------
CLIENT = """
import sys, time, numpy as np, grpc
sys.path.insert(0, sys.argv[3])
from test_clients import BIG, held_stream
import threading
ch = grpc.insecure_channel(sys.argv[1])
call = ch.stream_unary("/lifl.v1.Aggregation/Push").future(held_stream(int(sys.argv[2]), "phone", BIG, threading.Event()))
print("sending", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_stream_leaves_nothing_and_may_push_again(server):
    """A real client process dies (SIGKILL) mid-stream: its connection drops, the server frees the
    slot, records nothing, and the same client id pushes again."""
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    with Client(server.address) as c:
        rid = c.open_round(BIG, expected=1)
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.address, str(rid), tests_dir],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "sending"
            wait_for(lambda: c.round_info(rid).in_flight == 1, "the stream to be in flight")
            assert server.arena.stats().slots_in_use == 1
        finally:
            proc.kill()
            proc.wait(10)
        wait_for(lambda: nothing_held(server, c, rid, 0), "the slot to be freed")
        mine = perturb(BIG, 3)
        assert c.push(rid, mine, 2, "phone").accepted == 1
        got = c.pull(rid, wait_s=10)
    assert_matches(got, fedavg64([mine], [2]))


# -- 2. retry after a timeout ----------------------------------------------------------------------
def test_retry_of_an_accepted_update_is_idempotent(server):
    """The first push was accepted but its reply lost (the client timed out): pushing the same
    content again succeeds as a duplicate and is folded once; different content (bytes or weight)
    from that client is ALREADY_EXISTS."""
    a, b = perturb(BASE, 1), perturb(BASE, 2)
    with Client(server.address) as c:
        rid = c.open_round(BASE, expected=2)
        first = c.push(rid, a, 3, "phone")
        assert (first.accepted, first.duplicate) == (1, False)
        again = c.push(rid, a, 3, "phone")
        assert (again.accepted, again.duplicate) == (1, True)
        expect(grpc.StatusCode.ALREADY_EXISTS, "content differs", c.push, rid, b, 3, "phone")
        expect(grpc.StatusCode.ALREADY_EXISTS, "content differs", c.push, rid, a, 4, "phone")
        expect(grpc.StatusCode.ALREADY_EXISTS, "content differs", c.push, rid, a, 3, "phone", encoding="float16")
        assert nothing_held(server, c, rid, 1)
        c.push(rid, b, 1, "tablet")                    # completes the round
        late = c.push(rid, b, 1, "tablet")             # the last client's retry after the round closed
        assert late.duplicate and late.accepted == 2
        got = c.pull(rid, wait_s=10)
    assert_matches(got, fedavg64([a, b], [3, 1]))


def test_push_that_timed_out_before_acceptance_may_be_retried(server):
    """A push that times out on the client (its stream stalled) is cancelled on the server: the
    retry is taken — possibly after ABORTED while the server still reads the dead stream, which the
    Python client retries by itself."""
    mine = perturb(BIG, 5)
    gate = threading.Event()
    with Client(server.address) as c, Client(server.address, timeout_s=0.5) as impatient:
        rid = c.open_round(BIG, expected=1)
        with pytest.raises(RpcFailure) as ei:
            impatient.push_raw(held_stream(rid, "phone", mine, gate))
        assert ei.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        r = c.push(rid, mine, 1, "phone")
        gate.set()
        assert (r.accepted, r.duplicate) == (1, False)
        got = c.pull(rid, wait_s=10)
        assert nothing_held(server, c, rid, 1)
    assert_matches(got, fedavg64([mine], [1]))


# -- 3. a straggler after the deadline --------------------------------------------------------------
def test_straggler_after_the_deadline_is_refused_and_stores_nothing(clocked):
    """Past the deadline — before the control loop has closed the round, and after — a push, or a
    stream that began in time and ends late, is DEADLINE_EXCEEDED; nothing is stored."""
    srv, clock = clocked()
    on_time = perturb(BIG, 1)
    gate = threading.Event()
    out = {}
    with Client(srv.address) as c:
        rid = c.open_round(BIG, expected=3, quorum=1, deadline_s=10)
        c.push(rid, on_time, 2, "on-time")

        def slow():
            try:
                c.push_raw(held_stream(rid, "slow", perturb(BIG, 2), gate))
            except RpcFailure as e:
                out["e"] = e
        t = threading.Thread(target=slow)
        t.start()
        wait_for(lambda: c.round_info(rid).in_flight == 1, "the slow stream to be in flight")
        clock.advance(10.5)                            # the deadline passes; no tick yet: the round is open
        assert c.round_info(rid).state == "open"
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed", c.push, rid, perturb(BIG, 3), 1, "late")
        gate.set()
        t.join(30)
        assert out["e"].code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in out["e"].message
        assert nothing_held(srv, c, rid, 1)
        srv.tick()                                     # now the loop closes it with the quorum
        assert c.round_info(rid).state in ("aggregating", "done")
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed", c.push, rid, perturb(BIG, 3), 1, "later")
        got = c.pull(rid, wait_s=10)
    assert_matches(got, fedavg64([on_time], [2]))


# -- 4. one client, two concurrent streams -----------------------------------------------------------
def test_same_client_on_two_streams_exactly_one_wins(server):
    """While one stream of a client is being received a second is ABORTED (nothing stored). The
    Python client retries ABORTED: once the first is taken, an identical second push is answered
    as a duplicate and a different one is ALREADY_EXISTS — the update is folded once."""
    first, other = perturb(BIG, 1), perturb(BIG, 2)
    gate = threading.Event()
    out = {}
    with Client(server.address) as c:
        rid = c.open_round(BIG, expected=1)
        t1 = threading.Thread(target=lambda: out.update(first=c.push_raw(held_stream(rid, "phone", first, gate))))
        t1.start()
        wait_for(lambda: c.round_info(rid).in_flight == 1, "the first stream to be in flight")
        lay = Layout.from_arrays(other)
        expect(grpc.StatusCode.ABORTED, "still being received", c.push_raw,
               iter([header(rid, "phone", lay), encode_chunk(body(other))]))

        def python_client(key, arrays):
            try:
                out[key] = c.push(rid, arrays, 1, "phone")
            except RpcFailure as e:
                out[key] = e
        same = threading.Thread(target=python_client, args=("same", first))
        diff = threading.Thread(target=python_client, args=("diff", other))
        same.start()
        diff.start()
        time.sleep(0.3)                                # both are retrying ABORTED meanwhile
        gate.set()
        for t in (t1, same, diff):
            t.join(30)
        assert out["first"].accepted == 1 and not out["first"].duplicate
        assert not isinstance(out["same"], RpcFailure), out["same"]
        assert out["same"].duplicate and out["same"].accepted == 1
        assert out["diff"].code == grpc.StatusCode.ALREADY_EXISTS and "content differs" in out["diff"].message
        got = c.pull(rid, wait_s=10)
        info = c.round_info(rid)
    assert (info.accepted, info.total_weight) == (1, 1.0)
    assert_matches(got, fedavg64([first], [1]))
