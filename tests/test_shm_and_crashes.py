"""Shared memory: owner-only, budgeted, reused; nothing leaks when a function or the server is SIGKILLed."""
import os
import signal
import stat
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from conftest import small_model
from lifl.client import Client, RpcFailure
from lifl.shm import Arena, BudgetExhausted, SHM_DIR, Segment, list_segments, reclaim_stale


def test_segments_are_owner_only_and_budgeted(shm_prefix):
    with Arena(1000, prefix=shm_prefix) as a:
        s1 = a.acquire_slot(600)
        assert stat.S_IMODE(os.stat(SHM_DIR / s1.name).st_mode) == 0o600
        with pytest.raises(BudgetExhausted, match="budget full"):
            a.acquire_slot(600, timeout=0.05)
        with pytest.raises(BudgetExhausted, match="larger than the whole"):
            a.acquire_slot(2000)
        a.release_slot(s1.name)
        s2 = a.acquire_slot(600)
        assert s2.name == s1.name  # reused, not re-created
        a.release_slot(s2.name)
        s3 = a.acquire_slot(700)  # another size evicts the cached slot to fit the budget
        assert s3.name != s1.name and not (SHM_DIR / s1.name).exists()
        acc = a.scratch(64)
        assert len(list_segments(shm_prefix)) == 2 and acc.size == 64
    assert list_segments(shm_prefix) == []


def test_restart_reclaims_what_a_killed_server_left(shm_prefix):
    code = ("import sys, time; from lifl.shm import Arena; a = Arena(1 << 20, prefix=sys.argv[1]); "
            "a.acquire_slot(4096); a.scratch(8192); print('ready', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, shm_prefix], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert len(list_segments(shm_prefix)) == 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list_segments(shm_prefix)) == 2  # the crash left them behind ...
    with Arena(1 << 20, prefix=shm_prefix) as a:  # ... and the next server start reclaims them
        assert len(a.reclaimed) == 2
    assert list_segments(shm_prefix) == []
    assert reclaim_stale(shm_prefix) == []


def test_killed_function_fails_its_round_and_leaks_nothing(make_server, shm_prefix):
    srv = make_server(workers=2, leaves=2)
    base = small_model()
    with Client(srv.address) as c:
        rid = c.open_round(base, expected=3)
        c.push(rid, base, 1, "a")
        victim = srv.dispatcher.workers()[0].handle
        os.kill(victim.pid, signal.SIGKILL)
        for _ in range(100):
            if c.round_info(rid).state == "failed":
                break
            time.sleep(0.05)
        info = c.round_info(rid)
        assert info.state == "failed" and "died" in info.detail
        with pytest.raises(RpcFailure) as ei:
            c.pull(rid, wait_s=1)
        assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # a replacement started; the next round works
        for _ in range(100):
            if len(srv.dispatcher.workers()) == 2:
                break
            time.sleep(0.05)
        assert victim.pid not in [w.handle.pid for w in srv.dispatcher.workers()]
        r2 = c.open_round(base, expected=1)
        c.push(r2, base, 1, "a")
        got = c.pull(r2, wait_s=10)
    assert np.array_equal(got["conv.weight"], base["conv.weight"])


def test_functions_die_with_a_killed_server(shm_prefix):
    code = ("import sys, time; from lifl.server import EmbeddedServer; from lifl.config import ServerConfig; "
            "s = EmbeddedServer(ServerConfig(port=0, metrics_port=-1, workers=2, shm_prefix=sys.argv[1])).start(); "
            "print(' '.join(str(w.handle.pid) for w in s.dispatcher.workers()), flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, shm_prefix], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(100):
        if not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in pids):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("aggregator functions outlived the server")
    with Arena(1 << 20, prefix=shm_prefix):
        pass
    assert list_segments(shm_prefix) == []


def test_attach_sees_creator_writes(shm_prefix):
    with Arena(1 << 20, prefix=shm_prefix) as a:
        s = a.acquire_slot(4096)
        s.array()[:4] = [1, 2, 3, 4]
        with Segment.attach(s.name) as view:
            assert list(view.array()[:4]) == [1, 2, 3, 4]
