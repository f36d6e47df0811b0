import numpy as np
import pytest

from heteroswitch.aggregate import LocalFedAvg, fedavg_reference, lifl_available, make_aggregator

LIFL_OK, LIFL_WHY = lifl_available()


def _updates(seed=0):
    rng = np.random.default_rng(seed)
    return [({"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4),
              "steps": np.array([i * 3], np.int64)}, n) for i, n in enumerate([5, 7, 11])]


def test_local_fedavg_matches_hand_computed_weighted_mean():
    ups = _updates()
    agg = LocalFedAvg()
    agg.begin(ups[0][0], expected=3)
    for i, (a, n) in enumerate(ups):
        agg.submit(a, n, f"c{i}")
    out = agg.finish()
    w = (5 * ups[0][0]["w"].astype(np.float64) + 7 * ups[1][0]["w"] + 11 * ups[2][0]["w"]) / 23
    assert out["w"].dtype == np.float32 and np.allclose(out["w"], w, atol=1e-7)
    assert out["b"].dtype == np.float64 and np.allclose(out["b"], fedavg_reference(ups)["b"], atol=1e-15)
    assert out["steps"].dtype == np.int64 and int(out["steps"][0]) == round((0 * 5 + 3 * 7 + 6 * 11) / 23)


def test_local_fedavg_rejects_bad_updates():
    ups = _updates()
    agg = LocalFedAvg()
    agg.begin(ups[0][0], 2)
    agg.submit(ups[0][0], 5, "a")
    with pytest.raises(ValueError, match="already submitted"):
        agg.submit(ups[1][0], 5, "a")
    with pytest.raises(ValueError, match="shape"):
        agg.submit({**ups[1][0], "w": np.zeros((4, 3), np.float32)}, 5, "b")
    with pytest.raises(KeyError, match="tensor names"):
        agg.submit({"w": ups[1][0]["w"]}, 5, "c")
    with pytest.raises(ValueError, match="num_examples"):
        agg.submit(ups[1][0], 0, "d")


@pytest.mark.skipif(not LIFL_OK, reason=f"lifl.client cannot be imported: {LIFL_WHY}")
def test_lifl_aggregator_equals_reference_fedavg(server):
    ups = _updates(1)
    agg = make_aggregator("lifl", address=server.address)
    try:
        assert agg.name == "lifl"
        for _ in range(2):  # two rounds through the same server
            agg.begin(ups[0][0], expected=3)
            for i, (a, n) in enumerate(ups):
                agg.submit(a, n, f"c{i}")
            out = agg.finish()
            ref = fedavg_reference(ups)
            for k in ref:
                assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape
                assert np.allclose(out[k], ref[k], rtol=1e-6, atol=1e-7)
    finally:
        agg.close()


def _exact_updates(seed: int, weights: list[int]):
    """Updates whose weighted float64 sums are exact (multiples of 2**-10 times small weights), so any
    summation order gives the same sums and only the finalize decides the result; with many ties."""
    rng = np.random.default_rng(seed)
    return [({"w": (rng.integers(-4096, 4097, (5, 7)) / 1024).astype(np.float32),
              "b": rng.integers(-4096, 4097, 9) / 1024.0,
              "steps": rng.integers(-6, 7, 40).astype(np.int64),
              "count": rng.integers(0, 9, (4, 5)).astype(np.int32),
              "mask": rng.random(64) < 0.5,
              "scalar": np.array(rng.integers(0, 4), np.int64)}, n) for n in weights]


def _independent_fedavg(updates):
    """float64 numpy FedAvg with LIFL's documented finalize: ints to nearest (ties to even), bool ties False."""
    total = float(sum(n for _, n in updates))
    out = {}
    for k, like in updates[0][0].items():
        mean = sum(np.asarray(a[k], np.float64) * n for a, n in updates) / total
        out[k] = (mean > 0.5 if like.dtype == np.bool_ else
                  np.rint(mean).astype(like.dtype) if np.issubdtype(like.dtype, np.integer) else mean.astype(like.dtype))
    return out


@pytest.mark.skipif(not LIFL_OK, reason=f"lifl.client cannot be imported: {LIFL_WHY}")
def test_local_and_lifl_aggregation_agree_bit_for_bit(server):
    for weights in ([1, 1, 1, 1], [3, 5, 2, 6, 1]):
        ups = _exact_updates(len(weights), weights)
        results = {}
        for agg in (LocalFedAvg(), make_aggregator("lifl", address=server.address, job=f"bits-{len(weights)}")):
            try:
                agg.begin(ups[0][0], expected=len(ups))
                for i, (a, n) in enumerate(ups):
                    agg.submit(a, n, f"c{i}")
                results[agg.name] = agg.finish()
            finally:
                agg.close()
        local, lifl, ref = results["local"], results["lifl"], _independent_fedavg(ups)
        for k in ref:
            assert local[k].dtype == lifl[k].dtype == ref[k].dtype and local[k].shape == lifl[k].shape == ref[k].shape
            assert local[k].tobytes() == lifl[k].tobytes() == ref[k].tobytes(), (weights, k)
        if weights == [1, 1, 1, 1]:  # the ties this case is about really occur
            mean_mask = np.mean([a["mask"] for a, _ in ups], axis=0)
            mean_steps = np.mean([a["steps"] for a, _ in ups], axis=0)
            assert (mean_mask == 0.5).any() and not local["mask"][mean_mask == 0.5].any()
            assert (np.abs(mean_steps % 1) == 0.5).any()


def test_local_fedavg_rounds_ties_like_lifl():
    """Integer ties go to the even neighbour, a bool tie is False (LIFL's finalize, not a copy of it)."""
    ups = [({"i": np.array([2, 3, -3, 7], np.int64), "m": np.array([True, True, False])}, 1),
           ({"i": np.array([3, 4, -2, 7], np.int64), "m": np.array([False, True, False])}, 1)]
    out = fedavg_reference(ups)
    assert out["i"].tolist() == [2, 4, -2, 7] and out["m"].tolist() == [False, True, False]


def test_lifl_aggregator_needs_an_address():
    with pytest.raises(ValueError, match="address of a running LIFL server"):
        make_aggregator("lifl")


@pytest.mark.skipif(not LIFL_OK, reason=f"lifl.client cannot be imported: {LIFL_WHY}")
def test_auto_aggregator_is_lifl_with_an_address():
    agg = make_aggregator("auto")
    assert agg.name == "local"
    agg.close()
    agg = make_aggregator("auto", address="127.0.0.1:1")  # nothing is sent until a round begins
    try:
        assert agg.name == "lifl"
    finally:
        agg.close()
    with pytest.raises(ValueError, match="aggregator"):
        make_aggregator("bogus")
