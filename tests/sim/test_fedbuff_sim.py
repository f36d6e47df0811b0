"""The harness's asynchronous (FedBuff) training mode: its schedule follows the trace, its aggregation
equals an independent float64 FedBuff replay (modelled server and a real LIFL server alike), and
``lifl sim run --aggregation fedbuff`` runs end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lifl.cli import main
from lifl.client import Client
from lifl.sim import training
from lifl.sim.fedbuff import (Local, LiflFedBuff, ModelledFedBuff, Population, fedbuff_spec, run_fedbuff,
                             run_sync)

N, C, K, ETA, A = 24, 6, 3, 1.5, 0.5


def tiny_population(seed: int = 3) -> Population:
    rng = np.random.default_rng(seed)
    return Population(np.exp(rng.standard_normal(N)), rng.integers(10, 60, N).astype(np.float64))


def replay(pop: Population, local: Local, events, x0):
    """FedBuff written out in float64 from the accepted updates in arrival order (no lifl code but the
    task): τ from its own version count, s(τ) = ((1+τ̄)/(1+τ))^a with τ̄ = (C−1)/K, a version every K."""
    versions = [{k: v.astype(np.float64) for k, v in x0.items()}]
    published_at = [0.0]
    buf = []
    out = []
    for e in events:
        served = {k: v.astype(np.float32) for k, v in versions[e.base].items()}   # what a pull returns
        trained = local.task.local_train(served, local.seed, e.client, int(pop.weights[e.client]),
                                         lr=local.lr, epochs=local.epochs)
        delta = {k: (trained[k].astype(np.float64) - served[k]).astype(np.float32).astype(np.float64) for k in served}
        tau = len(versions) - 1 - e.base
        s = ((1 + (C - 1) / K) / (1 + tau)) ** A
        buf.append((pop.weights[e.client], s, delta))
        out.append((len(versions), tau))
        if len(buf) == K:
            total = sum(w for w, _, _ in buf)
            versions.append({k: versions[-1][k] + ETA * sum(w * s * d[k] for w, s, d in buf) / total
                             for k in versions[-1]})
            published_at.append(e.t)
            buf = []
    return versions, published_at, out


def check_against_replay(pop, local, curve, acc_tol=0.0):
    """``acc_tol``: a real server serves versions as float32 copies of its float64 master, which may
    differ from the replay's by one ulp; allow a test point or two to flip then."""
    x0 = training.initial_model(local.seed)
    versions, published_at, tickets = replay(pop, local, curve.events, x0)
    # the schedule: each update arrives its client's task time after it started, on the version newest then
    for e in curve.events:
        assert e.t == pytest.approx(e.started + pop.duration_s[e.client], abs=1e-12)
        assert e.base == max(i for i, t in enumerate(published_at) if t <= e.started)
    assert sum(1 for e in curve.events if e.started == 0.0) <= C
    assert [(e.version, e.staleness) for e in curve.events] == tickets
    assert max(e.staleness for e in curve.events) >= 1     # the trace really made updates stale
    # every version the driver evaluated, and the last model, equal the replay
    assert [p.step for p in curve.points] == list(range(len(versions)))
    for p in curve.points:
        m = {k: v.astype(np.float32) for k, v in versions[p.step].items()}
        assert p.accuracy == pytest.approx(local.accuracy(m), abs=acc_tol)
    for k, v in versions[-1].items():
        np.testing.assert_allclose(curve.final[k], v, rtol=1e-6, atol=1e-7)


def test_modelled_fedbuff_equals_independent_replay():
    pop, local = tiny_population(), Local(training, seed=5, lr=0.05)
    spec = fedbuff_spec(C, K, ETA, "polynomial", A)
    curve = run_fedbuff(pop, local, ModelledFedBuff(spec, training.initial_model(5)), concurrency=C,
                        buffer_size=K, horizon_s=12.0, seed=1)
    assert len(curve.points) > 8 and max(e.staleness for e in curve.events) >= 2   # really stale updates
    check_against_replay(pop, local, curve)


def test_updates_too_stale_are_refused_and_lost_alike_on_both_servers(make_server):
    """max_staleness: the driver drops what the server refuses; what was accepted still replays exactly."""
    pop, local = tiny_population(), Local(training, seed=5, lr=0.05)
    spec = fedbuff_spec(C, K, ETA, "polynomial", A, max_staleness=1)
    virt = run_fedbuff(pop, local, ModelledFedBuff(spec, training.initial_model(5)), concurrency=C,
                       buffer_size=K, horizon_s=6.0, seed=1)
    with Client(make_server(workers=2, leaves=1).address) as c:
        agg = LiflFedBuff(c, spec, training.initial_model(5), job="stale")
        real = run_fedbuff(pop, local, agg, concurrency=C, buffer_size=K, horizon_s=6.0, seed=1)
        refused = c.job_info("stale").refused_stale
        agg.close()
    assert virt.refused["FAILED_PRECONDITION"] > 0 and real.refused == virt.refused
    assert refused == virt.refused["FAILED_PRECONDITION"]
    assert max(e.staleness for e in virt.events) <= 1
    assert [(e.client, e.base, e.version) for e in real.events] == [(e.client, e.base, e.version) for e in virt.events]
    check_against_replay(pop, local, virt)


def test_real_server_fedbuff_equals_replay_and_the_modelled_run(make_server):
    srv = make_server(workers=2, leaves=1)
    pop, local = tiny_population(), Local(training, seed=5, lr=0.05)
    spec = fedbuff_spec(C, K, ETA, "polynomial", A)
    virt = run_fedbuff(pop, local, ModelledFedBuff(spec, training.initial_model(5)), concurrency=C,
                       buffer_size=K, horizon_s=8.0, seed=1)
    with Client(srv.address) as c:
        agg = LiflFedBuff(c, spec, training.initial_model(5), job="simfb")
        real = run_fedbuff(pop, local, agg, concurrency=C, buffer_size=K, horizon_s=8.0, seed=1)
        info = c.job_info("simfb")
        agg.close()
    assert info.version == len(real.points) - 1 and info.version >= 5
    assert [(e.client, e.base, e.version, e.staleness) for e in real.events] == \
           [(e.client, e.base, e.version, e.staleness) for e in virt.events]
    check_against_replay(pop, local, real, acc_tol=1e-3)


def test_sync_rounds_wait_for_their_slowest_and_average_in_float64():
    pop, local = tiny_population(), Local(training, seed=5, lr=0.05)
    curve = run_sync(pop, local, concurrency=C, horizon_s=15.0, server_lr=1.0, seed=2)
    rng = np.random.default_rng([2, 0x5c])
    x, t = training.initial_model(5), 0.0
    for p in curve.points[1:]:
        took = rng.choice(N, C, replace=False)
        t += pop.duration_s[took].max()
        ups = [local.train(x, c, pop.weights[c]) for c in took]
        w = pop.weights[took]
        x = {k: (sum(wi * u[k].astype(np.float64) for wi, u in zip(w, ups)) / w.sum()).astype(np.float32) for k in x}
        assert p.t == pytest.approx(t) and p.accuracy == local.accuracy(x)
    assert len(curve.points) >= 3
    # over-selection: the first C of 2C are kept, so rounds end sooner
    os_ = run_sync(pop, local, concurrency=C, horizon_s=15.0, over_selection=1.0, seed=2)
    assert len(os_.points) > len(curve.points) and os_.refused["discarded (over-selection)"] > 0


def test_lifl_sim_run_fedbuff_end_to_end(tmp_path, capsys, shm_prefix):
    out = tmp_path / "out"
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f"""
[workload]
clients_per_round = 8
population = 40
[trace]
kind = "straggler"
window_s = 0
compute_median_s = 1.0
compute_sigma = 1.0
[run]
mode = "both"
training = true
aggregation = "fedbuff"
buffer_size = 4
horizon_s = 10
progress = false
[server]
shm_prefix = "{shm_prefix}"
workers = 2
""")
    assert main(["sim", "run", "--config", str(cfg), "-o", str(out)]) == 0
    rec = json.loads((out / "run.json").read_text())
    got = {(v["mode"], v["variant"]): v for v in rec["variants"]}
    assert set(got) == {("real", "fedbuff"), ("virtual", "fedbuff"), ("virtual", "sync")}
    real, virt = got["real", "fedbuff"], got["virtual", "fedbuff"]
    assert len(real["rounds"]) == len(virt["rounds"]) >= 5
    for a, b in zip(real["rounds"], virt["rounds"]):
        assert (a["round"], a["start_s"]) == (b["round"], b["start_s"])
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-3)
    assert len(virt["rounds"]) > len(got["virtual", "sync"]["rounds"])   # no barrier: more steps in 10 s
    assert "Accuracy (training mode)" in (out / "report.md").read_text()


def test_fedbuff_settings_are_checked(tmp_path):
    from lifl.sim.config import SimConfigError, load
    with pytest.raises(SimConfigError, match="needs run.training"):
        load(None, {"run.aggregation": "fedbuff"})
    with pytest.raises(SimConfigError, match="population .* must be at least"):
        load(None, {"run.aggregation": "fedbuff", "run.training": True, "workload.clients_per_round": 10})
    with pytest.raises(SimConfigError, match="run.aggregation must be"):
        load(None, {"run.aggregation": "fedasync"})
