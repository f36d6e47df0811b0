"""Serverless behaviour on the embedded runtime: start on demand, warm reuse, role changes, scale to zero."""
import time

import numpy as np

from support import assert_matches, fedavg64, perturb, small_model
from lifl.client import Client

BASE = small_model()


def sample(srv, name, labels=None):
    return srv.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def wait_for(pred, timeout=10.0):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_no_function_runs_until_an_update_needs_one_then_scales_to_zero(clocked):
    srv, clock = clocked(workers=2, leaves=2, keep_alive_s=0.5)
    assert srv.snapshot().functions == ()          # nothing runs without work
    ups = [perturb(BASE, i) for i in range(4)]
    with Client(srv.address) as c:
        rid = c.open_round(BASE, expected=4)
        assert srv.snapshot().functions == ()      # an open round alone starts nothing
        c.push(rid, ups[0], 1, "a")
        assert len(srv.snapshot().functions) == 1  # the first update started one function
        assert sample(srv, "lifl_cold_starts_total") == 1
        assert sample(srv, "lifl_dispatches_total", {"start": "cold"}) == 1
        for i in range(1, 4):
            c.push(rid, ups[i], i + 1, f"c{i}")
        got = c.pull(rid, wait_s=20)
        assert_matches(got, fedavg64(ups, [1, 2, 3, 4]))
        # idle past the keep-alive: every function is stopped
        assert wait_for(lambda: {w.state for w in c.status().workers} == {"idle"}, 10)  # real replies
        srv.tick()
        assert len(c.status().workers) == 2        # not before the keep-alive
        clock.advance(0.6)
        srv.tick()
        assert c.status().workers == []
        assert sample(srv, "lifl_scale_downs_total") == 2
        # and the next round starts from zero again, still exact
        r2 = c.open_round(BASE, expected=1)
        c.push(r2, ups[3], 2, "a")
        assert_matches(c.pull(r2, wait_s=20), fedavg64([ups[3]], [2]))


def test_warm_functions_serve_the_next_round_and_change_roles(make_server):
    srv = make_server(workers=2, leaves=2, fan_in=2, keep_alive_s=60)
    ups = [perturb(BASE, i) for i in range(6)]
    with Client(srv.address) as c:
        r1 = c.open_round(BASE, expected=3)
        for i in range(3):
            c.push(r1, ups[i], 1, f"c{i}")
        assert_matches(c.pull(r1, wait_s=20), fedavg64(ups[:3], [1, 1, 1]))
        pids = sorted(w.pid for w in srv.snapshot().functions)
        cold = sample(srv, "lifl_cold_starts_total")
        assert cold == 2
        reuses = sample(srv, "lifl_warm_reuses_total")
        assert reuses == 1                         # the only reuse: a finished leaf took the top's role
        r2 = c.open_round(BASE, expected=3)
        for i in range(3, 6):
            c.push(r2, ups[i], 2, f"c{i}")
        assert_matches(c.pull(r2, wait_s=20), fedavg64(ups[3:], [2, 2, 2]))
        assert sorted(w.pid for w in srv.snapshot().functions) == pids   # same processes
        assert sample(srv, "lifl_cold_starts_total") == cold                      # no new cold start
        assert sample(srv, "lifl_warm_reuses_total") >= reuses + 2
        st = c.status()
        assert {w.state for w in st.workers} <= {"idle", "warm", "busy"} and len(st.workers) == 2


def test_min_workers_are_prestarted_and_kept(clocked):
    srv, clock = clocked(workers=3, min_workers=2, keep_alive_s=0.2)
    assert len(srv.snapshot().functions) == 2
    for _ in range(5):
        clock.advance(1.0)
        srv.tick()
    assert len(srv.snapshot().functions) == 2      # the floor holds while idle, long past the keep-alive


def test_elastic_planner_result_is_exact(make_server):
    srv = make_server(workers=3, leaves=3, fan_in=2, planner="elastic")
    ups = [perturb(BASE, i) for i in range(7)]
    ws = list(np.linspace(1, 7, 7))
    with Client(srv.address) as c:
        rid = c.open_round(BASE, expected=7)
        for i, u in enumerate(ups):
            c.push(rid, u, ws[i], f"c{i}")
        got = c.pull(rid, wait_s=20)
        assert "fan-in" in c.status().hierarchy
    assert_matches(got, fedavg64(ups, ws))


def test_plan_grows_mid_round_when_arrivals_outpace_one_leaf(make_server, monkeypatch):
    """Functions made slow (50 ms per fold) and a burst of arrivals: the planner adds leaves
    while the round is open, and the result is still exact."""
    srv = make_server(workers=3, leaves=3, fan_in=2, planner="elastic", fold_cores=3, fault_fold_delay_s=0.05)
    import threading
    model = {"w": np.zeros(200_000, np.float32)}
    ups = [{"w": np.full(200_000, i, np.float32)} for i in range(60)]
    with Client(srv.address) as c:
        rid = c.open_round(model, expected=60)
        assert len(srv.snapshot().round(rid).leaves) == 1
        threads = [threading.Thread(target=c.push, args=(rid, u, 1.0, f"c{i}")) for i, u in enumerate(ups)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join()
        got = c.pull(rid, wait_s=60)
        leaves = len(srv.snapshot().round(rid).leaves)
    assert sample(srv, "lifl_replans_total") >= 1 and leaves > 1
    assert_matches(got, fedavg64(ups, [1.0] * 60))
