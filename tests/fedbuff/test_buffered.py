"""FedBuff state machine and its float64 model against an independent replay of the paper's algorithm,
with Flower's own strategies as the server step."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lifl.engine.buffered import AsyncSpec, BufferedJob, FedBuffModel, Staleness
from lifl.engine.optimizers import ServerOptimizer
from lifl.errors import LiflError

pytest.importorskip("flwr")
from fedbuff_ref import FlowerStep, Reference  # noqa: E402

N = 37


OPTS = [("sgd", dict(lr=1.0)), ("sgd", dict(lr=0.6)), ("fedavgm", dict(lr=0.8, momentum=0.9)),
        ("fedadam", dict(lr=0.05)), ("fedyogi", dict(lr=0.05)), ("fedadagrad", dict(lr=0.05))]


@settings(max_examples=60, deadline=None)
@given(K=st.integers(1, 4), C=st.integers(1, 6), opt=st.sampled_from(OPTS),
       kind=st.sampled_from(["constant", "polynomial"]), a=st.sampled_from([0.0, 0.5, 1.0]),
       cutoff=st.integers(0, 3), max_st=st.integers(0, 4), seed=st.integers(0, 2**32 - 1),
       schedule=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["ok", "ok", "ok", "retry", "future"])),
                         min_size=1, max_size=40))
def test_versions_equal_independent_fedbuff(K, C, opt, kind, a, cutoff, max_st, seed, schedule):
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=N)
    okind, okw = opt
    spec = AsyncSpec(buffer_size=K, concurrency=C, max_staleness=max_st,
                     staleness=Staleness(kind, a, cutoff=cutoff, cutoff_weight=0.05),
                     optimizer=ServerOptimizer.of(okind, **okw))
    model = FedBuffModel(spec, x0)
    ref = Reference(x0, K, C, kind, a, cutoff, 0.05, max_st, FlowerStep(okind, x0, **okw))
    bases = [0] * C                      # the version each client trains on
    last = None
    for who, what in schedule:
        c = who % C
        if what == "retry" and last is not None:
            client, base, w, d = last    # the same update again
        else:
            client, base = f"c{c}", bases[c] + (2 if what == "future" else 0)
            w, d = float(rng.integers(1, 100)), rng.normal(scale=0.1, size=N)
        expect = ref.push(client, base, w, d)
        before = model.latest
        try:
            t = model.push(client, base, w, d)
            got = "OK"
        except LiflError as e:
            got = e.code
            assert f"current version is {model.latest}" in e.message
        assert got == expect, (client, base, model.latest)
        if got == "OK":
            assert t.tau == before - base
            last = (client, base, w, d)
        bases[c] = model.latest          # the client pulls the newest model and trains again
    assert model.latest == len(ref.versions) - 1
    for v in model.job.kept():
        np.testing.assert_allclose(model.pull(v), ref.versions[v], rtol=1e-6, atol=1e-9)


def test_staleness_functions():
    poly = AsyncSpec(buffer_size=2, concurrency=5, staleness=Staleness("polynomial", 0.5)).weigh
    assert poly.mean == 2.0 and poly(2) == pytest.approx(1.0)
    assert poly(0) == pytest.approx(3 ** 0.5) and poly(8) == pytest.approx((3 / 9) ** 0.5)
    assert AsyncSpec(staleness=Staleness("polynomial", 1.0), mean_staleness=0.0).weigh(3) == pytest.approx(0.25)
    assert AsyncSpec(staleness=Staleness("polynomial", 0.0)).weigh(7) == 1.0
    cut = AsyncSpec(staleness=Staleness("constant", cutoff=2, cutoff_weight=0.1)).weigh
    assert (cut(2), cut(3)) == (1.0, 0.1)


def test_versions_staleness_and_refusals():
    job = BufferedJob(AsyncSpec(buffer_size=2, concurrency=2, max_staleness=1, keep_versions=2))
    t1 = job.accept("a", 0, 1.0)
    assert (t1.buffer, t1.tau, t1.position, t1.seals) == (1, 0, 1, False)
    with pytest.raises(LiflError, match="already has an update in the buffer for version 1") as e:
        job.accept("a", 0, 1.0)
    assert e.value.code == "ALREADY_EXISTS"
    t2 = job.accept("b", 0, 1.0)
    assert t2.seals and job.open_buffer == 2 and job.latest == 0
    t3 = job.accept("a", 0, 1.0)          # the next buffer folds while version 1 is being published
    assert (t3.buffer, t3.tau) == (2, 0)
    job.published(1)
    with pytest.raises(RuntimeError, match="out of order"):
        job.published(3)
    assert job.accept("b", 0, 1.0).tau == 1 and job.latest == 1
    job.published(2)
    with pytest.raises(LiflError, match="2 versions stale .max 1.; the current version is 2") as e:
        job.check("c", 0)
    assert e.value.code == "FAILED_PRECONDITION"
    with pytest.raises(LiflError, match="base version 3 has not been published; the current version is 2") as e:
        job.accept("c", 3, 1.0)
    assert e.value.code == "OUT_OF_RANGE"
    with pytest.raises(LiflError):
        job.accept("c", 0, 1.0)
    assert job.refused_stale == 2 and job.buffer_fill == 0 and list(job.kept()) == [1, 2]


def test_model_refuses_bad_deltas_and_forgets_old_versions():
    m = FedBuffModel(AsyncSpec(buffer_size=1, concurrency=1, keep_versions=2), np.zeros(4))
    for bad in (np.zeros(3), np.array([0, np.nan, 0, 0])):
        with pytest.raises(LiflError) as e:
            m.push("a", 0, 1.0, bad)
        assert e.value.code == "INVALID_ARGUMENT"
    assert m.latest == 0 and m.job.buffer_fill == 0
    for v in range(3):
        m.push("a", v, 1.0, np.ones(4))
    np.testing.assert_array_equal(m.pull(), np.full(4, 3.0))
    with pytest.raises(LiflError, match="version 0 is not kept") as e:
        m.pull(0)
    assert e.value.code == "NOT_FOUND"
    assert not m.pull().flags.writeable


@pytest.mark.parametrize("spec,msg", [
    (AsyncSpec(buffer_size=0), "buffer size"),
    (AsyncSpec(concurrency=0), "concurrency"),
    (AsyncSpec(max_staleness=-1), "max staleness"),
    (AsyncSpec(keep_versions=0), "keep_versions"),
    (AsyncSpec(staleness=Staleness("hinge")), "unknown staleness function"),
    (AsyncSpec(staleness=Staleness("polynomial", 1.5)), "exponent"),
    (AsyncSpec(staleness=Staleness(cutoff=-1)), "cutoff must"),
    (AsyncSpec(staleness=Staleness(cutoff=2, cutoff_weight=2.0)), "cutoff weight"),
    (AsyncSpec(staleness=Staleness(cutoff=2, cutoff_weight=0.0)), "cutoff weight"),
    (AsyncSpec(mean_staleness=-1.0), "mean staleness"),
])
def test_bad_specs_are_refused(spec, msg):
    with pytest.raises(LiflError, match=msg) as e:
        BufferedJob(spec)
    assert e.value.code == "INVALID_ARGUMENT"
