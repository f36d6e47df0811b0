"""Shared memory: owner-only, budgeted, reused; nothing leaks when a function or the server is SIGKILLed."""
import mmap
import os
import resource
import signal
import stat
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from support import small_model
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


def test_shared_segment_lives_until_its_last_holder_lets_go(shm_prefix):
    with Arena(1000, prefix=shm_prefix) as a:
        res = a.scratch(128)                    # a round's result ...
        res.array()[:] = 7
        same = a.share(res.name)                # ... opened as the next round's initial model
        assert same is res and len(list_segments(shm_prefix)) == 1
        a.release_scratch(res.name)             # the first round is evicted: still held
        assert a.get(res.name).array()[0] == 7
        assert a.scratch(128).name != res.name  # not back in the pool either
        a.free(res.name)                        # the second round lets go: gone
        assert not (SHM_DIR / res.name).exists()
        with pytest.raises(KeyError):
            a.share(res.name)
    assert list_segments(shm_prefix) == []


def test_two_arenas_in_one_process_never_collide(shm_prefix):
    with Arena(1000, prefix=shm_prefix) as a, Arena(1000, prefix=shm_prefix) as b:
        assert a.scratch(64).name != b.scratch(64).name        # two servers in one process, same prefix
    assert list_segments(shm_prefix) == []


def test_results_take_idle_slots_and_give_them_back_within_the_budget(shm_prefix):
    with Arena(1000, prefix=shm_prefix) as a:
        s1, s2 = a.acquire_slot(400), a.acquire_slot(400)
        a.release_slot(s1.name)
        a.release_slot(s2.name)                 # the round's updates are folded: two idle slots
        r1 = a.result_segment(400)
        assert r1.name in (s1.name, s2.name)    # the result takes one of them, no new segment
        assert len(list_segments(shm_prefix)) == 2
        s3 = a.acquire_slot(400)                # the next round's first push gets the other one
        r2 = a.result_segment(400)              # no idle slot left: a new segment
        assert r2.name not in (s1.name, s2.name, s3.name)
        a.recycle_as_slot(r1.name)              # budget 1000: 400 in use + 400 cached fits
        assert a.acquire_slot(400).name == r1.name
        a.recycle_as_slot(r2.name)              # 800 in use + 400 would not: unlinked
        assert not (SHM_DIR / r2.name).exists()
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


def test_killed_idle_function_is_replaced_and_round_completes(make_server, shm_prefix):
    from support import assert_matches, fedavg64, perturb
    srv = make_server(workers=2, leaves=2)
    base = small_model()
    ups = [perturb(base, i) for i in range(3)]
    with Client(srv.address) as c:
        rid = c.open_round(base, expected=3)
        c.push(rid, ups[0], 1, "a")
        victim = srv.snapshot().functions[0]
        os.kill(victim.pid, signal.SIGKILL)
        for _ in range(100):
            if victim.pid not in [w.pid for w in srv.snapshot().functions]:
                break
            time.sleep(0.05)
        assert victim.pid not in [w.pid for w in srv.snapshot().functions]
        c.push(rid, ups[1], 2, "b")
        c.push(rid, ups[2], 3, "c")
        got = c.pull(rid, wait_s=20)
    assert_matches(got, fedavg64(ups, [1, 2, 3]))
    assert srv.metrics.registry.get_sample_value("lifl_function_failures_total") == 1


def test_functions_die_with_a_killed_server(shm_prefix):
    code = ("import sys, time; from lifl.server import EmbeddedServer; from lifl.config import ServerConfig; "
            "s = EmbeddedServer(ServerConfig(port=0, metrics_port=-1, workers=2, min_workers=2, "
            "shm_prefix=sys.argv[1])).start(); "
            "print(' '.join(str(w.pid) for w in s.snapshot().functions), flush=True); time.sleep(60)")
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


@pytest.mark.parametrize("trial", range(3))
def test_function_killed_mid_fold_is_rerun_exactly_once(make_server, monkeypatch, trial):
    """Functions sleep after writing each fold and before replying; we SIGKILL them in that window
    (and at random other moments). The round's result must still be exact: re-run, never folded twice."""
    import random

    from support import assert_matches, fedavg64, perturb
    srv = make_server(workers=2, leaves=2, fan_in=2, fault_fold_delay_s=0.15)
    base = small_model(trial)
    ups = [perturb(base, 100 * trial + i) for i in range(8)]
    ws = [float(i + 1) for i in range(8)]
    rnd = random.Random(trial)
    killed = 0
    with Client(srv.address) as c:
        rid = c.open_round(base, expected=8)
        for i, (u, w) in enumerate(zip(ups, ws)):
            c.push(rid, u, w, f"c{i}")
            time.sleep(rnd.uniform(0.0, 0.1))
            busy = [x for x in c.status().workers if x.state == "busy"]   # folding (or about to)
            if busy and killed < 3:
                os.kill(busy[0].pid, signal.SIGKILL)
                killed += 1
        got = c.pull(rid, wait_s=60)
        assert c.round_info(rid).state == "done"
    assert killed >= 1
    assert srv.metrics.registry.get_sample_value("lifl_tasks_retried_total") >= 1
    assert_matches(got, fedavg64(ups, ws))


def _mapped_segments(pid: int, prefix: str) -> set[str]:
    """Names of the prefix's shared-memory files a process maps (unlinked ones end in ' (deleted)')."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split("/dev/shm/", 1)[1].strip() for line in f if f"/dev/shm/{prefix}" in line}


def _round_of_three(srv, base):
    from support import assert_matches, fedavg64, perturb
    ups = [perturb(base, i) for i in range(3)]
    with Client(srv.address) as c:
        rid = c.open_round(base, expected=3)
        for i, u in enumerate(ups):
            c.push(rid, u, i + 1, f"c{i}")
        assert_matches(c.pull(rid, wait_s=20), fedavg64(ups, [1, 2, 3]))
    return rid


def test_an_idle_server_holds_only_kept_results_and_functions_unmap_the_rest(make_server, shm_prefix):
    srv = make_server(workers=2, leaves=2, keep_rounds=1)
    base = small_model()
    _round_of_three(srv, base)
    pids = [w.pid for w in srv.snapshot().functions]
    assert pids, "the round ran on functions"
    for _ in range(100):      # forget commands are asynchronous: wait for the functions to unmap
        held = set(list_segments(shm_prefix))
        mapped = set().union(*(_mapped_segments(p, shm_prefix) for p in pids))
        if not any(m.endswith("(deleted)") for m in mapped):
            break
        time.sleep(0.05)
    assert len(held) == 1, held                       # the round's result, nothing cached
    assert not any(m.endswith("(deleted)") for m in mapped), mapped   # no unlinked segment still mapped
    st = srv.arena.stats()
    assert st.slot_bytes_cached == 0 and st.slots_in_use == 0
    _round_of_three(srv, base)                        # the next round maps fresh segments, same exact result
    for _ in range(100):
        if len(list_segments(shm_prefix)) == 1:
            break
        time.sleep(0.05)
    assert len(list_segments(shm_prefix)) == 1        # keep_rounds=1: the first result went too


def test_release_idle_shm_off_keeps_the_cache_for_the_next_round(make_server, shm_prefix):
    srv = make_server(workers=2, leaves=2, release_idle_shm=False)
    _round_of_three(srv, small_model())
    # the result plus the two leaves' accumulators and journals (and any spare update slot), kept
    assert len(list_segments(shm_prefix)) >= 5
    assert srv.arena.stats().other_bytes > 2 * 8 * sum(a.size for a in small_model().values())


def test_arena_trim_unlinks_only_cached_segments_and_reports_them(shm_prefix):
    with Arena(4 << 20, prefix=shm_prefix) as arena:
        held = arena.acquire_slot(1 << 20)
        cached = arena.acquire_slot(1 << 20)
        arena.release_slot(cached.name)
        acc = arena.scratch(2 << 20)
        arena.release_scratch(acc.name)
        result = arena.segment(1 << 20)
        assert len(list_segments(shm_prefix)) == 4
        assert arena.trim() == (1 << 20) + (2 << 20)            # the cached slot and the cached accumulator
        assert sorted(list_segments(shm_prefix)) == sorted([held.name, result.name])
        assert sorted(arena.drain_unlinked()) == sorted([cached.name, acc.name])
        assert arena.drain_unlinked() == []
        arena.free(result.name)
        assert arena.drain_unlinked() == [result.name]
        arena.release_slot(held.name)
    assert list_segments(shm_prefix) == []


def _write_faults(seg: Segment) -> int:
    """Minor page faults this thread takes writing every byte of ``seg``."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    seg.array()[:] = 7
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_a_prefaulted_slot_is_written_without_a_fault_per_page(shm_prefix):
    """A writer (a gateway, another process's mapping) populates a fresh slot in one call:
    filling it then takes (almost) no page faults, where a plain mapping takes one per page."""
    size = 8 << 20
    pages = size // mmap.PAGESIZE
    with Arena(4 * size, prefix=shm_prefix) as a:
        slot = a.acquire_slot(size)
        with Segment.attach(slot.name) as plain:
            assert _write_faults(plain) > pages // 2
        with Segment.attach(slot.name, prefault=True) as warm:
            if not warm.prefault():
                pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
            assert _write_faults(warm) < pages // 20
            assert int(slot.array()[size - 1]) == 7   # the same pages the arena's own mapping sees
        a.release_slot(slot.name)


def test_prefaulting_a_segment_lets_the_processs_other_threads_run(shm_prefix):
    """A gateway process prefaults each fresh slot while its other streams copy chunks: the
    kernel's mapping of the pages (tens of ms for 256 MiB) must not hold the GIL. Another thread
    counts its loops per millisecond into a preallocated array (no allocation that could wait on
    the kernel's memory-map lock); it must have run in the middle of the call, where with the GIL
    held throughout it cannot run Python at all."""
    import threading
    import time
    size = 256 << 20
    with Arena(size, prefix=shm_prefix) as a:
        slot = a.acquire_slot(size)
        with Segment.attach(slot.name) as seg:
            per_ms = np.zeros(100_000, np.int64)
            origin, stop, started = [time.monotonic()], threading.Event(), threading.Event()

            def spin():
                started.set()
                while not stop.is_set():
                    per_ms[int((time.monotonic() - origin[0]) * 1000)] += 1
            t = threading.Thread(target=spin)
            t.start()
            try:
                started.wait(10)
                t0 = time.monotonic()
                populated = seg.prefault()
                t1 = time.monotonic()
            finally:
                stop.set()
                t.join()
            if not populated:
                pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
            ms = lambda x: int((x - origin[0]) * 1000)
            middle = per_ms[ms(t0 + 0.4 * (t1 - t0)):ms(t1 - 0.1 * (t1 - t0))]
            assert len(middle) >= 5 and middle.sum() >= 10, (t1 - t0, middle.tolist())
        a.release_slot(slot.name)


def test_a_new_scratch_segment_reads_as_zeros_and_a_reused_one_keeps_its_bytes(shm_prefix):
    """Accumulators and journals come from ``scratch``: a new one is zero (a fresh journal's
    generations mean "nothing folded yet") though the head never writes it; a reused one is not
    cleared (its journal's generations tell stale bytes from folded ones)."""
    with Arena(1 << 20, prefix=shm_prefix) as a:
        seg = a.scratch(3 << 20)
        assert not seg.array().any()
        seg.array()[:] = 5
        a.release_scratch(seg.name)
        again = a.scratch(3 << 20)
        assert again.name == seg.name and (again.array() == 5).all()
        a.release_scratch(again.name)
