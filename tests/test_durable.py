"""Durable mode (``durable_dir``): a real ``lifl serve`` process tree is SIGKILLed at several points
of a round's life and started again on the same directory; every acknowledged update counts, every
result is the float64 FedAvg of exactly the acknowledged updates, and no shared memory is left."""
from __future__ import annotations

import os
import threading
import time

import grpc
import pytest

from benchmarks.killable import KillableServe
from lifl.client import Client
from lifl.durable import wal
from lifl.durable.journal import WAL_NAME
from lifl.shm import Arena, list_segments
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk
from support import assert_matches, expect, fedavg64, perturb, small_model, wire_bytes

BASE = small_model()
UPS = {f"c{i}": perturb(BASE, 100 + i) for i in range(12)}
W = {f"c{i}": float(i + 1) for i in range(12)}


def reference(clients):
    return fedavg64([UPS[c] for c in clients], [W[c] for c in clients])


def push(c: Client, rid: int, client: str):
    return c.push(rid, UPS[client], W[client], client)


def state(c: Client, rid: int) -> str:
    return c.round_info(rid).state


def wait_state(c: Client, rid: int, want: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while state(c, rid) != want:
        assert time.monotonic() < deadline, f"round {rid} never became {want}: {c.round_info(rid)}"
        time.sleep(0.02)


def cut_push(address: str, rid: int, client: str, sent: threading.Event, release: threading.Event, out: list):
    """A push whose stream stops half way (its bytes never end) until ``release``."""
    layout_msg = pb.PushHeader(round=rid, client_id=client, num_examples=W[client])
    raw = wire_bytes(UPS[client], "raw")
    from lifl.layout import Layout
    Layout.from_arrays(UPS[client]).to_proto(layout_msg.tensors)
    layout_msg.total_size = len(raw)

    def messages():
        yield pb.PushRequest(header=layout_msg).SerializeToString()
        yield encode_chunk(raw[:len(raw) // 2])
        sent.set()
        release.wait(30)
    with Client(address, retry_s=0) as c:
        try:
            c.push_raw(messages())
            out.append("acknowledged")
        except Exception as e:   # the server died under it: not acknowledged
            out.append(getattr(e, "code", e))


@pytest.fixture
def durable(tmp_path, shm_prefix):
    with KillableServe(tmp_path / "run", durable_dir=str(tmp_path / "durable"), shm_prefix=shm_prefix,
                       workers=2, leaves=2, fan_in=2, planner="static", keep_rounds=8) as s:
        yield s
    # the last start reclaimed what every killed one left; its graceful stop unlinked the rest
    with Arena(1 << 20, prefix=shm_prefix):
        pass


def data_files(s: KillableServe) -> list[str]:
    return sorted(os.listdir(os.path.join(s.settings["durable_dir"], "data")))


def test_sigkill_of_the_whole_server_at_every_point_loses_no_acknowledged_update(durable, shm_prefix):
    s = durable.start()
    # 1. killed after some acknowledgements, and 2. with a push cut mid-stream
    sent, release, out = threading.Event(), threading.Event(), []
    with Client(s.address) as c:
        r1 = c.open_round(BASE, expected=5)
        r2 = c.open_round(BASE, expected=3)
        for cl in ("c0", "c1", "c2"):
            push(c, r1, cl)
        push(c, r2, "c3")
        t = threading.Thread(target=cut_push, args=(s.address, r2, "c4", sent, release, out))
        t.start()
        assert sent.wait(10)
        deadline = time.monotonic() + 10
        while c.round_info(r2).in_flight != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    s.kill_tree()
    release.set()
    t.join(30)
    assert out and out[0] != "acknowledged"
    assert list_segments(shm_prefix), "the kill should have left shared memory behind (the restart reclaims it)"

    s.start()
    with Client(s.address) as c:
        i1, i2 = c.round_info(r1), c.round_info(r2)
        assert (i1.state, i1.accepted, i1.total_weight) == ("open", 3, W["c0"] + W["c1"] + W["c2"])
        assert (i2.state, i2.accepted, i2.in_flight) == ("open", 1, 0)
        # an acknowledged client that resends the same update gets a duplicate success (the
        # journal kept its digest), different content is refused; the cut one may push again
        assert push(c, r1, "c1").duplicate
        expect(grpc.StatusCode.ALREADY_EXISTS, "already accepted", c.push, r1, UPS["c2"], W["c1"], "c1")
        push(c, r2, "c4")
        for cl in ("c5", "c6"):
            push(c, r1, cl)
        push(c, r2, "c7")
        assert_matches(c.pull(r1, wait_s=30), reference(["c0", "c1", "c2", "c5", "c6"]))
        assert_matches(c.pull(r2, wait_s=30), reference(["c3", "c4", "c7"]))
    # 3. killed after finalize (results persisted): the server process alone this time (its
    # functions follow it by PR_SET_PDEATHSIG), and 4. the whole tree after close, before finalize
    s.kill_gateway()
    s.start(fault_fold_delay_s=2.0)   # functions pause 2 s after each fold: a window after close
    with Client(s.address) as c:
        assert c.round_info(r1).state == "done"
        assert_matches(c.pull(r1), reference(["c0", "c1", "c2", "c5", "c6"]))
        assert push(c, r1, "c5").duplicate   # a finished round's digests survive the restart too
        r3 = c.open_round(BASE, expected=3)
        for cl in ("c8", "c9", "c10"):
            push(c, r3, cl)
        assert state(c, r3) == "aggregating"   # closed (all arrived), folds still running
    s.kill_tree()
    s.start()
    with Client(s.address) as c:
        assert_matches(c.pull(r3, wait_s=30), reference(["c8", "c9", "c10"]))
        assert_matches(c.pull(r2), reference(["c3", "c4", "c7"]))
        info = c.round_info(r3)
        assert (info.accepted, info.total_weight) == (3, W["c8"] + W["c9"] + W["c10"])
        # round ids go on after the recovered ones
        assert c.open_round(BASE, expected=1) == r3 + 1
    # on disk: the kept results, and the open round's initial model; done rounds' updates are let go
    assert s.tracebacks() == 0
    files = data_files(s)
    assert [f for f in files if f.startswith("result-")] == [f"result-{r}.bin" for r in sorted((r1, r2, r3))]
    assert len(files) == 4
    assert s.stop() == 0


def test_a_killed_function_and_refusals_in_durable_mode(durable):
    s = durable.start()
    with Client(s.address) as c:
        rid = c.open_round(BASE, expected=3)
        push(c, rid, "c0")
        victim = c.status().workers[0].pid
        os.kill(victim, 9)
        deadline = time.monotonic() + 10
        while victim in [w.pid for w in c.status().workers]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        push(c, rid, "c1")
        push(c, rid, "c2")
        assert_matches(c.pull(rid, wait_s=30), reference(["c0", "c1", "c2"]))
        # what durable mode does not cover is refused, not silently volatile
        from lifl.engine.optimizers import ServerOptimizer
        expect(grpc.StatusCode.UNIMPLEMENTED, "synchronous rounds only", c.open_async, BASE, job="fedbuff")
        expect(grpc.StatusCode.UNIMPLEMENTED, "durable mode", c.open_round, BASE, expected=1,
               optimizer=ServerOptimizer.of("fedavgm", lr=1.0, momentum=0.9))
    assert s.stop() == 0
    assert s.tracebacks() == 0


def test_wal_drops_a_torn_last_record_and_refuses_damage_elsewhere(tmp_path):
    p = tmp_path / "wal.jsonl"
    recs = [{"t": "open", "rid": 1}, {"t": "accept", "rid": 1, "client": "a"}, {"t": "close", "rid": 1}]
    good = b"".join(wal.frame(r) for r in recs)
    p.write_bytes(good + wal.frame({"t": "accept", "rid": 1})[:-7])         # cut mid-record
    assert wal.read(p) == (recs, len(good))
    p.write_bytes(good + b"00000000 " + wal.frame({"t": "done"})[9:])       # a whole line, wrong CRC
    assert wal.read(p) == (recs, len(good))
    damaged = bytearray(good)
    damaged[20] ^= 0x01                                                     # inside the first record
    p.write_bytes(bytes(damaged))
    with pytest.raises(wal.WalCorrupt, match="record 1"):
        wal.read(p)


def test_a_durable_dir_serves_one_server_at_a_time(tmp_path):
    """A second server on the same directory is refused (EBUSY, a one-line error from ``lifl
    serve``) while the first holds it, and gets it once the first lets go."""
    import errno
    from lifl.durable.recover import take_lock
    fd = take_lock(tmp_path)
    with pytest.raises(OSError, match="in use by another running server") as e:
        take_lock(tmp_path, wait_s=0.1)
    assert e.value.errno == errno.EBUSY
    os.close(fd)
    os.close(take_lock(tmp_path, wait_s=0.1))


def test_restart_after_a_torn_tail_resumes_and_refuses_a_damaged_log(durable):
    s = durable.start()
    with Client(s.address) as c:
        rid = c.open_round(BASE, expected=3)
        push(c, rid, "c0")
        push(c, rid, "c1")
        done = c.open_round(BASE, expected=1)
        push(c, done, "c5")
        c.pull(done, wait_s=30)
        nxt = c.open_round(from_round=done, expected=1)          # starts from a persisted result
        dl = c.open_round(BASE, expected=4, quorum=2, deadline_s=2.0)
        push(c, dl, "c6")
        push(c, dl, "c7")
    s.kill_tree()
    log = os.path.join(s.settings["durable_dir"], WAL_NAME)
    with open(log, "ab") as f:      # what a kill during an append leaves
        f.write(wal.frame({"t": "accept", "rid": rid, "client": "c2", "weight": 3.0, "file": "x.bin"})[:25])
    s.start()
    with Client(s.address) as c:
        assert c.round_info(rid).accepted == 2
        push(c, rid, "c2")
        assert_matches(c.pull(rid, wait_s=30), reference(["c0", "c1", "c2"]))
        # the round opened from a result still serves it as its model; its own result follows
        assert_matches(c.pull(nxt, initial=True), reference(["c5"]))
        push(c, nxt, "c8")
        assert_matches(c.pull(nxt, wait_s=30), reference(["c8"]))
        # a deadline keeps running while the server is down: closed with the quorum it had
        assert_matches(c.pull(dl, wait_s=30), reference(["c6", "c7"]))
        assert "deadline passed with 2 of 4" in c.round_info(dl).detail
    assert s.tracebacks() == 0
    s.kill_tree()
    data = bytearray(open(log, "rb").read())
    data[12] ^= 0x01                # the first record: not a torn write
    open(log, "wb").write(bytes(data))
    with pytest.raises(RuntimeError, match="damaged and records follow it"):
        s.start()
    assert s.tracebacks() == 0   # refused in one line ("lifl: ... damaged ..."), exit 1
