"""Evaluation metrics, pure numpy.

Averaged precision "the FLAIR way": precision and recall are computed at
``num_thresholds = 200`` evenly spaced score thresholds (like
``tf.keras.metrics.AUC(num_thresholds=200, curve="PR")``: ``t_0 = -eps``,
``t_j = j / (T - 1)``, ``t_{T-1} = 1 + eps``; a score is a positive
prediction when ``score > t``), and

    AP = sum_j (R_j - R_{j+1}) * P_j,   R_T = 0

(the step-wise Riemann sum; keras' default interpolation differs slightly --
we use the step sum because it has no degenerate cases and is what
``average_precision_score`` computes at full resolution).  ``P_j`` with no
positive predictions contributes nothing because then ``R_j = R_{j+1} = 0``.

* ``macro``: AP per class, averaged over classes that have >= 1 positive.
* ``micro``: AP over all (sample, class) pairs pooled.
* single-label data are scored one-vs-rest: targets become one-hot, scores
  are the class probabilities.

Device-level summaries (:func:`device_summary`): mean, population variance
(``ddof=0``) and standard deviation, worst device, and the unseen device's
score, over all devices and over the seen ones.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "thresholds",
    "pr_counts",
    "average_precision",
    "accuracy",
    "softmax",
    "one_hot",
    "device_summary",
]

_EPS = 1e-7


def thresholds(num_thresholds: int = 200) -> np.ndarray:
    if num_thresholds < 2:
        raise ValueError("num_thresholds must be >= 2")
    t = np.linspace(0.0, 1.0, num_thresholds)
    t[0], t[-1] = -_EPS, 1.0 + _EPS
    return t


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D class indices, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    out = np.zeros((labels.size, num_classes), dtype=bool)
    out[np.arange(labels.size), labels] = True
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _as_targets(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {scores.shape}")
    targets = np.asarray(targets)
    if targets.ndim == 1:  # single-label -> one-vs-rest
        targets = one_hot(targets, scores.shape[1])
    if targets.shape != scores.shape:
        raise ValueError(f"targets shape {targets.shape} does not match scores {scores.shape}")
    return scores, targets.astype(bool)


def pr_counts(scores: np.ndarray, positive: np.ndarray, num_thresholds: int = 200):
    """TP and FP counts at each threshold for 1-D ``scores`` / boolean ``positive``.

    Bucketing instead of an (N x T) comparison: ``b = #{t_j < s}``, and a score
    is predicted positive at threshold ``j`` iff ``b > j``.
    """
    t = thresholds(num_thresholds)
    b = np.searchsorted(t, scores, side="left")  # number of thresholds strictly below the score
    hp = np.bincount(b[positive], minlength=num_thresholds + 1)
    hn = np.bincount(b[~positive], minlength=num_thresholds + 1)
    # predicted positive at j <=> b >= j + 1
    tp = np.cumsum(hp[::-1])[::-1][1:]
    fp = np.cumsum(hn[::-1])[::-1][1:]
    return tp.astype(np.float64), fp.astype(np.float64)


def _ap_1d(scores: np.ndarray, positive: np.ndarray, num_thresholds: int) -> float:
    npos = positive.sum()
    if npos == 0:
        return float("nan")
    tp, fp = pr_counts(scores, positive, num_thresholds)
    rec = tp / npos
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    rec_next = np.append(rec[1:], 0.0)
    return float(np.sum((rec - rec_next) * prec))


def average_precision(scores, targets, average: str = "macro", num_thresholds: int = 200) -> float:
    """FLAIR-style averaged precision; see the module docstring."""
    scores, targets = _as_targets(scores, targets)
    if scores.shape[0] == 0:
        raise ValueError("average_precision of an empty set")
    if average == "micro":
        return _ap_1d(scores.ravel(), targets.ravel(), num_thresholds)
    if average == "macro":
        aps = [_ap_1d(scores[:, c], targets[:, c], num_thresholds) for c in range(scores.shape[1])]
        aps = [a for a in aps if not np.isnan(a)]
        return float(np.mean(aps)) if aps else float("nan")
    raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")


def accuracy(scores, labels) -> float:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape[0] != labels.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"need matching, non-empty scores {scores.shape} and labels {labels.shape}")
    return float(np.mean(scores.argmax(axis=1) == labels))


def device_summary(per_device: dict[str, float], unseen: str | None = None) -> dict[str, float | str]:
    """Mean / variance / worst over devices; ``seen_*`` exclude the unseen device."""
    if not per_device:
        raise ValueError("device_summary needs at least one device")
    if unseen is not None and unseen not in per_device:
        raise KeyError(f"unseen device {unseen!r} has no score; devices: {sorted(per_device)}")
    names = list(per_device)
    v = np.array([per_device[n] for n in names], dtype=np.float64)
    seen = np.array([per_device[n] for n in names if n != unseen], dtype=np.float64)
    w = int(np.argmin(v))
    out: dict[str, float | str] = {
        "mean": float(v.mean()),
        "var": float(v.var()),
        "std": float(v.std()),
        "worst": float(v[w]),
        "worst_device": names[w],
        "best": float(v.max()),
    }
    if seen.size:
        out.update(seen_mean=float(seen.mean()), seen_var=float(seen.var()), seen_worst=float(seen.min()))
    if unseen is not None:
        out["unseen"] = float(per_device[unseen])
    return out
