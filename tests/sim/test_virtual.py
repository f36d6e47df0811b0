"""The discrete-event model on scenarios computed by hand (costs chosen to make the arithmetic exact)."""
from __future__ import annotations

import numpy as np
import pytest

from lifl.config import ServerConfig
from lifl.sim.calibrate import Costs
from lifl.sim.virtual import VirtualServer, run_virtual
from lifl.sim.workload import RoundPlan

MiB = 2**20
COSTS = Costs(push_overhead_s=1.0, ingest_Bps=float("inf"), update_s=0.1, fuse_speedup=1.0, partial_s=0.25,
              finalize_s=0.05, cold_start_s=0.5, flower_per_update_s=0.2, gateway_cpu_push_s=0.5)


def row(ready, rnd=1, reports=None):
    n = len(ready)
    return RoundPlan(rnd, np.arange(n), np.ones(n, bool) if reports is None else np.array(reports),
                     np.array(ready, float), np.full(n, 10.0), n)


def server(**kw):
    kw = {"workers": 1, "leaves": 1, "planner": "static", "keep_alive_s": 30.0, **kw}
    return ServerConfig(**kw)


def test_one_leaf_all_at_once():
    # pushes end at 1, 2, 3, 4 (1 s each, one gateway); the first needs a cold start (ready 1.5),
    # folds 1.5-1.6, 2.0-2.1, 3.0-3.1, 4.0-4.1; the last arrival closes the round; finalize +0.05
    sim = VirtualServer(server(), COSTS, update_bytes=1000, numel=250, cores_per_node=1)
    rr = sim.run_round(row([0, 0, 0, 0]), 0.0)
    assert rr.round_s == pytest.approx(4.15) and rr.post_arrival_s == pytest.approx(0.15)
    assert (rr.reported, rr.cold_starts, rr.warm_reuses, rr.leaves) == (4, 1, 0, 1)
    assert sim.cpu["gateway"] == pytest.approx(4 * 0.5)
    # the next round reuses the warm function: no cold start
    rr2 = sim.run_round(row([0, 0], rnd=2), sim.now)
    assert (rr2.cold_starts, rr2.warm_reuses) == (0, 1) and rr2.round_s == pytest.approx(2.15)


def test_a_full_slot_budget_holds_the_gateway_back():
    # one update slot (1 MiB budget, 1 MiB updates): a push waits for the previous fold to free it
    sim = VirtualServer(server(shm_budget_mb=1), COSTS, update_bytes=MiB, numel=MiB // 4, cores_per_node=1)
    rr = sim.run_round(row([0, 0, 0]), 0.0)
    # push 0-1, cold start to 1.5, fold to 1.6; push 1.6-2.6, fold to 2.7; push 2.7-3.7, fold 3.8; +0.05
    assert rr.round_s == pytest.approx(3.85)


def test_tree_waits_for_the_slowest_child_then_finalises():
    # two leaves on two cores, fan-in 2: arrivals at 1 (leaf 0) and 2 (leaf 1); both functions cold
    # (ready 1.5, 2.5), folds end 1.6 and 2.6; the parent folds one partial (0.25) then finalises (0.05)
    sim = VirtualServer(server(workers=2, leaves=2, fan_in=2), COSTS, update_bytes=1000, numel=250,
                        cores_per_node=2)
    rr = sim.run_round(row([0, 0]), 0.0)
    assert rr.leaves == 2 and rr.cold_starts == 2
    assert rr.round_s == pytest.approx(2.6 + 0.25 + 0.05)


def test_dropouts_close_the_round_at_the_last_report():
    sim = VirtualServer(server(), COSTS, update_bytes=1000, numel=250, cores_per_node=1)
    rr = sim.run_round(row([0, 0, 5], reports=[True, False, True]), 0.0)
    # pushes end at 1 and 6: folds 1.5-1.6 and 6.0-6.1, finalize 6.15
    assert rr.reported == 2 and rr.refused == {"dropped_out": 1} and rr.round_s == pytest.approx(6.15)


def test_keep_alive_decides_cold_or_warm_in_the_next_round():
    def second_round_cold(keep_alive):
        sim = VirtualServer(server(keep_alive_s=keep_alive), COSTS, update_bytes=1000, numel=250, cores_per_node=1)
        sim.run_round(row([0]), 0.0)
        rr = sim.run_round(row([20.0], rnd=2), sim.now)  # the next client comes 20 s later
        return rr.cold_starts, sim.scale_downs
    assert second_round_cold(30.0) == (0, 0)
    assert second_round_cold(2.0) == (1, 1)  # stopped by the autoscaler after the keep-alive, started again


def test_more_functions_than_cores_wait_for_a_core():
    # two leaves, one core: the second leaf's fold waits for the first
    sim = VirtualServer(server(workers=2, leaves=2, fan_in=2), COSTS, update_bytes=1000, numel=250,
                        cores_per_node=1)
    rr = sim.run_round(row([0, 0]), 0.0)
    # arrivals 1 and 2, cold until 1.5 / 2.5: folds 1.5-1.6 and 2.5-2.6 do not overlap: same as two cores
    assert rr.round_s == pytest.approx(2.9)
    sim2 = VirtualServer(server(workers=2, leaves=2, fan_in=2), Costs(**{**COSTS.__dict__, "update_s": 2.0}),
                         update_bytes=1000, numel=250, cores_per_node=1)
    rr2 = sim2.run_round(row([0, 0]), 0.0)
    # folds: leaf0 1.5-3.5; leaf1 ready at 2.5 but the core is busy until 3.5: 3.5-5.5; tree + finalize
    assert rr2.round_s == pytest.approx(5.5 + 0.25 + 0.05)


def test_serverful_baseline_collects_then_aggregates():
    rec = run_virtual(lambda r, t: row([0, 0, 0]), 1, "serverful", server(), COSTS, 1000, 250)
    rr = rec.rounds[0]
    # three 1 s pushes, then Flower's aggregate over all three (0.2 s each), holding all three updates
    assert rr.round_s == pytest.approx(3.6) and rr.post_arrival_s == pytest.approx(0.6)
    assert rec.peak_pss_bytes == 3000


def test_elastic_planner_is_the_real_one():
    # the elastic planner on 4 cores with a high arrival rate asks for several leaves
    sim = VirtualServer(ServerConfig(workers=4, leaves=4, planner="elastic"), COSTS, update_bytes=10**8,
                        numel=25 * 10**6, cores_per_node=4)
    from lifl.control.planner import plan_elastic
    from lifl.control.model import FoldCosts, Load, PlannerPolicy, Resources
    est = 10**8 / 2e9
    want = plan_elastic(Load(400, 400 / 10.0), FoldCosts(est, 2.0, 2 * est, est), sim.nodes, Resources(cores=1.0),
                        PlannerPolicy(max_leaves=4))
    rr = sim.run_round(row([0] * 400), 0.0)
    assert rr.leaves == want.leaves


def test_two_nodes_split_arrivals_and_use_the_real_plan_and_placement():
    from lifl.control.model import FoldCosts, Load, PlannerPolicy, Resources
    from lifl.control.placement import place
    from lifl.control.planner import plan_elastic
    sim = VirtualServer(ServerConfig(workers=4, leaves=2, planner="elastic"), COSTS, update_bytes=10**6,
                        numel=250_000, nodes=2, cores_per_node=2)
    est = 10**6 / 2e9
    plan = plan_elastic(Load(200, 200 / 10.0), FoldCosts(est, 2.0, 2 * est, est), sim.nodes, Resources(cores=1.0),
                        PlannerPolicy(max_leaves=4))
    want = place(plan.hierarchy, plan.leaf_home, sim.nodes, Resources(cores=1.0),
                 leaf_update_bytes=10**6 * round(200 / plan.leaves), partial_bytes=250_000 * 8)
    rr = sim.run_round(row([0] * 200), 0.0)
    assert rr.leaves == plan.leaves and {"node0", "node1"} <= set(plan.leaf_home)
    assert sim.cross_node_bytes == want.cross_node_bytes
    # the two gateways take 100 pushes of 1 s each in parallel: the last lands at t = 100
    assert sim.gateways.taken("node0") == sim.gateways.taken("node1") == 100
    assert 100.0 < rr.round_s < 101.0 and rr.post_arrival_s < 1.0


# -- the engine's ablation settings, in virtual time ------------------------------------------------

def test_lazy_folds_nothing_before_the_round_closes():
    # pushes end at 1, 2, 3, 4; the function is warm at 1.5 but waits for the close (t = 4);
    # then one fused batch of 4 (fuse 1.0: 4 x 0.1 s) to 4.4, finalize to 4.45 (eager: 4.15)
    sim = VirtualServer(server(fold_when="lazy"), COSTS, update_bytes=1000, numel=250, cores_per_node=1)
    rr = sim.run_round(row([0, 0, 0, 0]), 0.0)
    assert rr.round_s == pytest.approx(4.45) and rr.post_arrival_s == pytest.approx(0.45)
    assert (rr.cold_starts, rr.leaves) == (1, 1)
    assert sim.peak_slots == 4   # every update held its slot until the close


def test_lazy_refuses_a_round_that_does_not_fit_the_slot_budget():
    from lifl.sim.config import SimConfigError
    sim = VirtualServer(server(fold_when="lazy", shm_budget_mb=2), COSTS, update_bytes=MiB, numel=MiB // 4,
                        cores_per_node=1)
    with pytest.raises(SimConfigError, match="shm_budget_mb"):
        sim.run_round(row([0, 0, 0]), 0.0)


def test_no_reuse_starts_a_function_for_every_role_and_round():
    # round 1: the leaf is cold (1 -> 1.5), folds 1.5-1.6, 2.0-2.1, 3.0-3.1, 4.0-4.1; the finalize is the
    # top's role, a fresh function: 4.1 + 0.5 + 0.05 = 4.65; two cold starts, and both stop with the round
    sim = VirtualServer(server(reuse_functions=False), COSTS, update_bytes=1000, numel=250, cores_per_node=1)
    rr = sim.run_round(row([0, 0, 0, 0]), 0.0)
    assert rr.round_s == pytest.approx(4.65) and (rr.cold_starts, rr.warm_reuses) == (2, 0)
    assert sim.insts == []
    # round 2 (keep_alive 30 s would have kept a function warm): cold again, 1.5-1.6, 2.0-2.1, +0.5 +0.05
    rr2 = sim.run_round(row([0, 0], rnd=2), sim.now)
    assert rr2.round_s == pytest.approx(2.65) and (rr2.cold_starts, rr2.warm_reuses) == (2, 0)
    assert sim.cold_starts == 4 and sim.cpu["functions"] == pytest.approx(4 * 0.5 + 6 * 0.1 + 2 * 0.05)


def test_no_reuse_parent_is_a_fresh_function():
    # two leaves (cold, ready 1.5 / 2.5; folds end 1.6 / 2.6); the parent starts fresh after its slowest
    # child: 2.6 + 0.5 (start) + 0.25 (partial), and it finalises too (same role): + 0.05
    sim = VirtualServer(server(workers=2, leaves=2, fan_in=2, reuse_functions=False), COSTS, update_bytes=1000,
                        numel=250, cores_per_node=2)
    rr = sim.run_round(row([0, 0]), 0.0)
    assert rr.round_s == pytest.approx(2.6 + 0.5 + 0.25 + 0.05) and rr.cold_starts == 3


def test_pipe_transport_sends_each_update_to_the_function_first():
    # 1000-byte updates at 1e-4 s/byte: 0.1 s on the socket before each 0.1 s fold:
    # folds 1.5-1.7, 2.0-2.2, 3.0-3.2, 4.0-4.2, finalize 4.25; the sender's CPU goes to the gateway
    costs = Costs(**{**COSTS.__dict__, "pipe_s_per_byte": 1e-4, "pipe_cpu_per_byte": 5e-5})
    rec = run_virtual(lambda r, t: row([0, 0, 0, 0]), 1, "no_shm", server(update_transport="pipe"), costs,
                      1000, 250, cores_per_node=1)
    assert rec.rounds[0].round_s == pytest.approx(4.25)
    assert rec.cpu["gateway"] == pytest.approx(4 * 0.5 + 4 * 1000 * 5e-5)
    assert rec.bytes_between_processes == 2 * 4 * 1000   # client -> gateway, then gateway -> function
    same = run_virtual(lambda r, t: row([0, 0, 0, 0]), 1, "lifl", server(), costs, 1000, 250, cores_per_node=1)
    assert same.rounds[0].round_s == pytest.approx(4.15) and same.bytes_between_processes == 4000


def test_every_command_pays_its_round_trip():
    # command_s = 0.01: folds 1.5-1.61, 2.0-2.11, 3.0-3.11, 4.0-4.11, finalize +0.05 +0.01 -> 4.17;
    # lazy: one batch of 4 at the close, 4.0-4.41, finalize -> 4.47 (each command once, not each update)
    costs = Costs(**{**COSTS.__dict__, "command_s": 0.01})
    for kw, want in (({}, 4.17), ({"fold_when": "lazy"}, 4.47)):
        sim = VirtualServer(server(**kw), costs, update_bytes=1000, numel=250, cores_per_node=1)
        assert sim.run_round(row([0, 0, 0, 0]), 0.0).round_s == pytest.approx(want), kw
