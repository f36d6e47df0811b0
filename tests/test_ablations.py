"""The engine's ablation settings (``lifl sim`` variants): each turns off one design choice and
must still aggregate exactly; what it changes is observed through metrics and the snapshot."""
import time

import pytest

from support import assert_matches, fedavg64, metric, perturb, small_model
from lifl.client import Client
from lifl.config import ServerConfig
from lifl.control.planner import plan_static
from lifl.engine.reduction import Reduction, Update
from lifl.layout import Layout

BASE = small_model()


def _round(srv, n, weights=None):
    ups = [perturb(BASE, i) for i in range(n)]
    weights = weights or [float(i + 1) for i in range(n)]
    with Client(srv.address) as c:
        rid = c.open_round(BASE, expected=n)
        for i, u in enumerate(ups):
            c.push(rid, u, weights[i], f"c{i}")
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, weights))
    return rid


def test_lazy_reduction_takes_no_fold_before_close():
    red = Reduction(1, plan_static(1, 2), [("local", "local")], lazy=True)
    red.add(0, Update("s1", 1.0, "a"))
    red.add(0, Update("s2", 2.0, "b"))
    assert red.take_fold(0) is None            # collecting
    red.close()
    (fin,) = red.ready()                       # one leaf: all of it folded and finalised in one pass
    assert [u.slot for u in fin.updates] == ["s1", "s2"] and fin.weight == 3.0


def test_lazy_folds_only_after_close_and_is_exact(make_server):
    srv = make_server(fold_when="lazy", leaves=2)
    _round(srv, 5)
    # nothing was folded while the round was open: every update went into the finalize's spans
    assert metric(srv, "lifl_fold_seconds_count", level="leaf") == 0
    assert metric(srv, "lifl_fold_seconds_count", level="top") >= 1


def test_no_reuse_starts_a_fresh_function_for_every_role_and_stops_it(make_server):
    srv = make_server(reuse_functions=False, leaves=2, fan_in=2, workers=4)
    _round(srv, 4)
    assert metric(srv, "lifl_warm_reuses_total") == 0
    assert metric(srv, "lifl_cold_starts_total") == 3      # two leaves and the top, each its own
    deadline = time.monotonic() + 20                      # real processes: poll, bounded
    while srv.snapshot().functions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.snapshot().functions == ()                 # stopped when done, no keep-alive
    _round(srv, 4)                                        # and the next round starts afresh
    assert metric(srv, "lifl_cold_starts_total") == 6


def test_pipe_transport_sends_every_update_over_the_socket_and_is_exact(make_server):
    srv = make_server(update_transport="pipe", leaves=2)
    _round(srv, 6)
    assert metric(srv, "lifl_pipe_bytes_total") == 6 * Layout.from_arrays(BASE).total_size
    assert srv.arena.stats().slots_in_use == 0


def test_the_default_moves_no_update_bytes_through_pipes(make_server):
    srv = make_server(leaves=2)
    _round(srv, 3)
    assert metric(srv, "lifl_pipe_bytes_total") == 0


@pytest.mark.parametrize("bad, msg", [({"fold_when": "later"}, "fold_when"),
                                      ({"update_transport": "tcp"}, "update_transport"),
                                      ({"update_transport": "pipe", "runtime": "ray"}, "local runtime only")])
def test_bad_ablation_settings_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        ServerConfig(**bad).validate()
