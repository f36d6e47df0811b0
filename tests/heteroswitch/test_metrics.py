import numpy as np
import pytest

from heteroswitch import metrics


def brute_force_ap(scores, positive, T=200):
    """Independent, loop-based AP: explicit thresholds and counts."""
    ts = [j / (T - 1) for j in range(T)]
    ts[0], ts[-1] = -1e-7, 1 + 1e-7
    npos = sum(positive)
    P, R = [], []
    for t in ts:
        tp = sum(1 for s, p in zip(scores, positive) if s > t and p)
        fp = sum(1 for s, p in zip(scores, positive) if s > t and not p)
        P.append(tp / (tp + fp) if tp + fp else 0.0)
        R.append(tp / npos)
    R.append(0.0)
    return sum((R[j] - R[j + 1]) * P[j] for j in range(T))


def test_ap_matches_brute_force_multilabel_macro_and_micro():
    rng = np.random.default_rng(0)
    y = rng.random((60, 5)) < 0.3
    y[0] = True  # every class has a positive
    s = np.clip(0.4 * y + 0.6 * rng.random((60, 5)), 0, 1)
    s[1, 0] = 0.5  # exactly on a threshold grid point region
    macro = np.mean([brute_force_ap(s[:, c].tolist(), y[:, c].tolist()) for c in range(5)])
    micro = brute_force_ap(s.ravel().tolist(), y.ravel().tolist())
    assert metrics.average_precision(s, y, "macro") == pytest.approx(macro, abs=1e-12)
    assert metrics.average_precision(s, y, "micro") == pytest.approx(micro, abs=1e-12)


def test_single_label_is_one_vs_rest():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 40)
    p = metrics.softmax(rng.normal(size=(40, 4)) + 2 * np.eye(4)[labels])
    onehot = np.eye(4, dtype=bool)[labels]
    assert metrics.average_precision(p, labels) == pytest.approx(metrics.average_precision(p, onehot))
    ref = np.mean([brute_force_ap(p[:, c].tolist(), onehot[:, c].tolist()) for c in range(4)])
    assert metrics.average_precision(p, labels) == pytest.approx(ref, abs=1e-12)


def test_ap_edge_cases():
    y = np.array([1, 0, 1, 0], bool)
    assert metrics.average_precision(np.array([[1.0], [0.0], [1.0], [0.0]]), y[:, None]) == pytest.approx(1.0)
    # class without positives is excluded from the macro mean
    s = np.array([[0.9, 0.1], [0.2, 0.8]])
    t = np.array([[1, 0], [1, 0]], bool)
    assert metrics.average_precision(s, t, "macro") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="macro"):
        metrics.average_precision(s, t, "weighted")
    with pytest.raises(ValueError, match="does not match"):
        metrics.average_precision(s, np.zeros((3, 2), bool))


def test_accuracy_and_device_summary():
    assert metrics.accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == 0.5
    per = {"A": 0.8, "B": 0.6, "C": 0.7, "U": 0.5}
    s = metrics.device_summary(per, unseen="U")
    v = np.array(list(per.values()))
    assert s["mean"] == pytest.approx(v.mean()) and s["var"] == pytest.approx(v.var())
    assert s["worst"] == 0.5 and s["worst_device"] == "U" and s["unseen"] == 0.5
    assert s["seen_mean"] == pytest.approx(0.7) and s["seen_var"] == pytest.approx(np.var([0.8, 0.6, 0.7]))
    with pytest.raises(KeyError, match="unseen device"):
        metrics.device_summary(per, unseen="Z")
