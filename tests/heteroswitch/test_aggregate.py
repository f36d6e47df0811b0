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
def test_lifl_aggregator_equals_reference_fedavg():
    ups = _updates(1)
    agg = make_aggregator("lifl")
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


def test_auto_aggregator_prefers_lifl_when_available():
    agg = make_aggregator("auto")
    try:
        assert agg.name == ("lifl" if LIFL_OK else "local")
    finally:
        agg.close()
    with pytest.raises(ValueError, match="aggregator"):
        make_aggregator("bogus")
