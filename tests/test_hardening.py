"""Regression tests for the defects an outside fuzz/crash run found (issue 12): each failed before its fix."""
import math
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from support import expect, FlakyStarts, assert_matches, fedavg64, perturb, small_model
from lifl.client import Client, RpcFailure, retryable
from lifl.config import ServerConfig
from lifl.layout import Layout
from lifl.server import EmbeddedServer
from lifl.shm import list_segments
from lifl.rpc import retry_trailers
from lifl.v1 import aggregation_pb2 as pb

BASE = small_model()
LAYOUT = Layout.from_arrays(BASE)


@pytest.fixture
def flaky_server(shm_prefix):
    servers = []

    def make(runtime, **kw):
        kw = {"workers": 2, "leaves": 2, "fan_in": 2, **kw}
        cfg = ServerConfig(port=0, metrics_port=-1, planner="static", shm_prefix=shm_prefix, **kw)
        srv = EmbeddedServer(cfg, runtime=runtime).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


# -- 1, 2: functions that die while they start ---------------------------------------------------
def test_function_killed_during_its_cold_start_inside_a_push_is_replaced_and_the_result_exact(flaky_server):
    rt = FlakyStarts(fail={1})                     # the first function dies while it starts
    srv = flaky_server(rt)
    ups = [perturb(BASE, i) for i in range(3)]
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=3)
        receipts = [c.push(rid, u, i + 1, f"c{i}") for i, u in enumerate(ups)]
        assert [r.accepted for r in receipts] == [1, 2, 3]
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, [1, 2, 3]))
    assert rt.starts >= 2


def test_when_no_function_can_start_a_push_is_refused_with_nothing_recorded(flaky_server):
    rt = FlakyStarts(fail_all=True)
    srv = flaky_server(rt)
    ups = [perturb(BASE, i) for i in range(2)]
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=2)
        expect(grpc.StatusCode.UNAVAILABLE, "could start", c.push, rid, ups[0], 1, "a")
        info = c.round_info(rid)
        assert (info.accepted, info.in_flight, info.total_weight, info.state) == (0, 0, 0.0, "open")
        rt.fail_all = False                        # functions can start again: the retry is accepted
        c.push(rid, ups[0], 1, "a")
        c.push(rid, ups[1], 3, "b")
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, [1, 3]))
    assert srv.arena.stats().slots_in_use == 0


def _kill_leaf_function(srv) -> None:
    with Client(srv.address) as c:
        pids = [w.pid for w in c.status().workers]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_a_replacement_that_dies_while_starting_is_retried(flaky_server):
    rt = FlakyStarts()
    srv = flaky_server(rt, leaves=1)
    ups = [perturb(BASE, i) for i in range(3)]
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=3)
        c.push(rid, ups[0], 2, "a")                # folded into the leaf's sum in shared memory
        rt.fail = {rt.starts + 1}                  # the replacement's first start dies too
        _kill_leaf_function(srv)
        c.push(rid, ups[1], 1, "b")
        c.push(rid, ups[2], 5, "c")
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, [2, 1, 5]))
        assert c.round_info(rid).state == "done"


def test_a_round_fails_with_a_reason_only_when_functions_cannot_start_at_all(flaky_server):
    rt = FlakyStarts()
    srv = flaky_server(rt, leaves=1)
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=3)
        c.push(rid, perturb(BASE, 0), 1, "a")
        rt.fail_all = True
        _kill_leaf_function(srv)
        deadline = time.monotonic() + 20
        while c.round_info(rid).state != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        info = c.round_info(rid)
        assert info.state == "failed" and "could start" in info.detail, info


# -- 3: shutdown with kept rounds and an open one ----------------------------------------------
def test_shutdown_with_kept_rounds_and_an_open_one_is_clean(shm_prefix):
    srv = EmbeddedServer(ServerConfig(port=0, metrics_port=-1, workers=1, leaves=1, planner="static",
                                      keep_rounds=8, shm_prefix=shm_prefix)).start()
    with Client(srv.address) as c:
        for i in range(9):
            rid = c.open_round(BASE, expected=1)
            c.push(rid, perturb(BASE, i), 1, "a")
            c.pull(rid, wait_s=30)
        c.open_round(BASE, expected=2)
    srv.stop()                                     # raised "dictionary changed size during iteration"
    assert list_segments(shm_prefix) == []


def _address_when_ready(p: subprocess.Popen, ready, timeout: float = 15.0) -> str:
    """Wait (bounded: a real process) for ``lifl serve --ready-file`` to say where it listens."""
    import json
    end = time.monotonic() + timeout
    while not (ready.exists() and ready.read_text()):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < end, "lifl serve did not become ready"
        time.sleep(0.05)
    return json.loads(ready.read_text())["address"]


def test_lifl_serve_exits_cleanly_on_sigterm_with_kept_rounds(tmp_path, shm_prefix):
    ready = tmp_path / "ready.json"
    p = subprocess.Popen([sys.executable, "-m", "lifl", "serve", "--port", "0", "--metrics-port", "-1",
                          "--ready-file", str(ready)], env={**os.environ, "LIFL_SHM_PREFIX": shm_prefix},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        addr = _address_when_ready(p, ready)
        with Client(addr) as c:
            for i in range(9):
                rid = c.open_round(BASE, expected=1)
                c.push(rid, perturb(BASE, i), 1, "a")
                c.pull(rid, wait_s=30)
            c.open_round(BASE, expected=2)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err, err
    assert list_segments(shm_prefix) == []


# -- 4: weights that overflow --------------------------------------------------------------------
def test_huge_weights_are_refused_and_an_overflowing_sum_never_becomes_a_result(server):
    with Client(server.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=2)
        for n in (1e308, 2.0**53 * 2):
            expect(grpc.StatusCode.INVALID_ARGUMENT, "num_examples", c.push, rid, perturb(BASE, 1), n, "a")
        info = c.round_info(rid)
        assert (info.accepted, info.total_weight) == (0, 0.0)
        c.close_round(rid, abort=True)
        big = {"w": np.full(8, 1e300)}                 # finite float64 values × 2**53 overflow the sum
        rid = c.open_round(big, expected=2)
        c.push(rid, big, 2.0**53, "a")
        c.push(rid, big, 2.0**53, "b")
        e = expect(grpc.StatusCode.FAILED_PRECONDITION, "overflowed", c.pull, rid, wait_s=30)
        assert c.round_info(rid).state == "failed", e


# -- 5: absurd model sizes ----------------------------------------------------------------------------
def _open_header(shape, dtype="float32", total=0, encoding=pb.ENCODING_RAW, job="default", name="w"):
    h = pb.OpenRoundHeader(job=job, expected=1, total_size=total, encoding=encoding)
    t = h.tensors.add()
    t.name, t.dtype = name, dtype
    t.shape.extend(shape)
    return pb.OpenRoundRequest(header=h).SerializeToString()


def _raw_open(address, msgs):
    with grpc.insecure_channel(address) as ch:
        call = ch.stream_unary("/lifl.v1.Admin/OpenRound")
        try:
            call(iter(msgs), timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_absurd_declared_shapes_are_refused_before_anything_is_created(server, shm_prefix):
    for shape in ([2**62], [2**59], [2**40, 2**40], [2**28 + 16]):
        code, msg = _raw_open(server.address, [_open_header(shape)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (shape, code, msg)
        assert "bytes" in msg and len(msg) < 1100
        assert list_segments(shm_prefix) == []
    with Client(server.address) as c:                 # the server is fine
        assert c.status().version


def test_a_model_larger_than_free_shared_memory_is_refused(make_server, shm_prefix):
    from lifl.shm import free_bytes
    free = free_bytes()
    mb = free // 2**20 + 64
    srv = make_server(shm_budget_mb=mb, max_model_mb=mb)
    code, msg = _raw_open(srv.address, [_open_header([free // 4 + 2**20])])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in msg, (code, msg)
    assert list_segments(shm_prefix) == []


SMALL_SHM = r'''
set -e
mount -t tmpfs -o size=48m tmpfs /dev/shm
exec "$@"
'''


def test_a_small_dev_shm_gives_errors_not_sigbus(tmp_path):
    """As in a container with a 48 MiB /dev/shm (its own mount namespace): rounds that do not
    fit are refused with RESOURCE_EXHAUSTED, nothing is left behind, the server keeps serving."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.decode().strip()}")
    ready = tmp_path / "ready.json"
    p = subprocess.Popen(["unshare", "-m", "sh", "-c", SMALL_SHM, "sh", sys.executable, "-m", "lifl", "serve",
                          "--port", "0", "--metrics-port", "-1", "--leaves", "2", "--workers", "2",
                          "--planner", "static", "--ready-file", str(ready)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        addr = _address_when_ready(p, ready)
        # 512 MiB declared in a 40-byte header: refused by the free-space check
        code, msg = _raw_open(addr, [_open_header([2**27])])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
        # passes the one-leaf estimate, but two leaves' float64 sums do not fit: a clean refusal
        model = {"w": np.ones(3 * 2**20, np.float32)}           # 12 MiB
        with Client(addr, retry_s=0) as c:
            expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "shared memory", c.open_round, model, expected=2)
            small = {"w": np.ones(2**16, np.float32)}
            rid = c.open_round(small, expected=1)              # and it still serves
            c.push(rid, small, 1, "a")
            assert np.array_equal(c.pull(rid, wait_s=30)["w"], small["w"])
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- 6: an empty job is "default", never "any" ---------------------------------------------------------
def test_an_empty_job_never_reaches_another_jobs_round(server):
    with Client(server.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=2, job="probe-j")
        expect(grpc.StatusCode.NOT_FOUND, "does not exist", c.push, rid, BASE, 1, "a", job="")
        expect(grpc.StatusCode.NOT_FOUND, "does not exist", c.round_info, rid, job="")
        expect(grpc.StatusCode.NOT_FOUND, "does not exist", c.close_round, rid, abort=True, job="")
        expect(grpc.StatusCode.NOT_FOUND, "does not exist", c.pull, rid, job="", initial=True)
        assert c.round_info(rid, job="probe-j").state == "open"
        r2 = c.open_round(BASE, expected=1, job="")            # "" is the default job everywhere
        c.push(r2, BASE, 1, "a", job="")
        assert c.round_info(r2, job="default").state in ("aggregating", "done")


# -- 7: undecodable requests --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["/lifl.v1.Aggregation/GetRound", "/lifl.v1.Aggregation/Pull",
                                    "/lifl.v1.Admin/CloseRound", "/lifl.v1.Admin/Status"])
def test_undecodable_unary_requests_are_invalid_argument(server, method):
    bad_utf8 = pb.GetRoundRequest(round=1).SerializeToString() + b"\x0a\x02\xff\xfe"   # job = invalid UTF-8
    with grpc.insecure_channel(server.address) as ch:
        call = (ch.unary_stream if method.endswith("Pull") else ch.unary_unary)(method)
        for raw in (b"\xff",) if method.endswith("Status") else (b"\xff", bad_utf8):
            with pytest.raises(grpc.RpcError) as ei:
                r = call(raw, timeout=10)
                list(r) if method.endswith("Pull") else r
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw, ei.value.details())
            assert "not a valid" in ei.value.details()


# -- 8: pull waits ----------------------------------------------------------------------------------------------
def test_pull_waits_are_validated_or_clamped(server):
    with Client(server.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=1)
        for w in (float("nan"), -1.0):
            expect(grpc.StatusCode.INVALID_ARGUMENT, "wait_seconds", c.pull, rid, wait_s=w)
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_stream("/lifl.v1.Aggregation/Pull", request_serializer=pb.PullRequest.SerializeToString)
        for w in (1e10, float("inf"), 1e300):    # was UNKNOWN "timestamp out of range": now a long wait
            with pytest.raises(grpc.RpcError) as ei:
                list(call(pb.PullRequest(job="default", round=rid, wait_seconds=w), timeout=0.5))
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value.details()


# -- 9: unbounded strings, retries -----------------------------------------------------------------------------
def test_messages_quote_client_strings_bounded(server):
    huge = "j" * 100_000
    with Client(server.address, retry_s=5) as c:
        rid = c.open_round(BASE, expected=1)
        t0 = time.monotonic()
        e = expect(grpc.StatusCode.INVALID_ARGUMENT, "longer than", c.push, rid, BASE, 1, "a", job=huge)
        assert len(e.message) < 1100 and time.monotonic() - t0 < 4   # not retried for retry_s
        e = expect(grpc.StatusCode.INVALID_ARGUMENT, "client_id", c.push, rid, BASE, 1, "c" * 100_000)
        assert len(e.message) < 1100
        code, msg = _raw_open(server.address, [_open_header([2], name="n" * 50_000)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "longer than" in msg and len(msg) < 1100
        shape = [1] * 40
        code, msg = _raw_open(server.address, [_open_header(shape)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "dimensions" in msg


class _Err(grpc.RpcError):
    def __init__(self, code, details="", trailers=()):
        self._c, self._d, self._t = code, details, trailers

    def code(self):
        return self._c

    def details(self):
        return self._d

    def trailing_metadata(self):
        return self._t


def test_only_retryable_statuses_are_retried():
    RE = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retryable(_Err(RE, "slot budget full", (("retry-after-ms", "250"),))) == 0.25
    # google.rpc.RetryInfo wins over the plain trailer; an unreadable one falls back to it
    rich = retry_trailers(RE, "slot budget full", 1.5)
    assert retryable(_Err(RE, "slot budget full", (("retry-after-ms", "250"), rich[1]))) == 1.5
    assert retryable(_Err(RE, "busy", (("retry-after-ms", "250"), ("grpc-status-details-bin", b"\xff")))) == 0.25
    assert retryable(_Err(RE, "Concurrent RPC limit exceeded!")) is not None
    assert retryable(_Err(grpc.StatusCode.UNAVAILABLE)) is not None
    assert retryable(_Err(RE, "received metadata size exceeds hard limit")) is None
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                 grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
        assert retryable(_Err(code)) is None


# -- 10: encodings ------------------------------------------------------------------------------------------------
def test_open_round_refuses_unsupported_encodings(server, shm_prefix):
    for enc in (2, 99, -1):
        code, msg = _raw_open(server.address, [_open_header([4], encoding=enc)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "encoding" in msg, (enc, code, msg)
    with Client(server.address) as c:
        assert not c.status().rounds


# -- 12: a bound on calls in progress ------------------------------------------------------------------------
def test_calls_beyond_the_limit_are_refused_and_the_client_retries(make_server):
    srv = make_server(max_concurrent_rpcs=2)
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=1)
    with grpc.insecure_channel(srv.address) as ch:
        pull = ch.unary_stream("/lifl.v1.Aggregation/Pull", request_serializer=pb.PullRequest.SerializeToString)
        threads = []

        def hold():
            """A Pull that waits for the result, holding one of the two places while it waits."""
            r = pull(pb.PullRequest(job="default", round=rid, wait_seconds=30), timeout=30)
            threads.append(threading.Thread(target=lambda: pytest.raises(grpc.RpcError, list, r)))
            threads[-1].start()
            return r

        def refused(r) -> bool:
            return r.done() and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        waiting = [hold() for _ in range(2)]
        get = ch.unary_unary("/lifl.v1.Aggregation/GetRound",
                             request_serializer=pb.GetRoundRequest.SerializeToString)
        end = time.monotonic() + 20                # real calls: wait (bounded) until both pulls hold a place
        while True:
            # a pull that arrived while the server still counted an earlier call (open_round's, a
            # GetRound of this loop) was refused at the limit: another takes its turn
            waiting = [hold() if refused(r) else r for r in waiting]
            try:
                get(pb.GetRoundRequest(job="default", round=rid), timeout=5)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
            assert time.monotonic() < end, ("the two pulls never both got in: " +
                                            str([r.code() if r.done() else "waiting" for r in waiting]))
            time.sleep(0.02)
        with Client(srv.address, retry_s=0) as c:
            expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit", c.push, rid, BASE, 1, "a")
        threading.Timer(1.0, lambda: [w.cancel() for w in waiting]).start()
        with Client(srv.address, retry_s=20) as c:  # retried until the pulls have gone
            assert c.push(rid, BASE, 1, "a").accepted == 1
        for t in threads:
            t.join(10)
