"""The time-to-accuracy benchmark's task (a ``run.task`` module, docs/sim.md): harder than the default.

The default task (:mod:`lifl.sim.training`) starts from zeros, so one FedAvg step already points
the softmax weights at the class means and the accuracy is near its plateau after one round:
nothing to time. Here the model starts from random weights (``INIT_SCALE``) that local SGD has
to pull away from, over more classes (20) and a stronger label skew (Dirichlet(0.3)), so the
accuracy climbs over tens of rounds and the time to a target accuracy measures optimisation
progress per wall-clock second — which is what FedBuff and synchronous FedAvg differ in.
"""
from __future__ import annotations

import functools

import numpy as np

from lifl.sim.training import sgd

FEATURES, CLASSES = 48, 20
INIT_SCALE = 0.3       # std of the initial weights
CENTRE_SCALE = 0.35    # std of the class centres (unit-variance noise around them)
ALPHA = 0.3            # Dirichlet label skew per client
SCALE_DECADES = 1.0    # feature j is scaled by 10^(−SCALE_DECADES·j/(FEATURES−1)): an ill-conditioned problem
SCALES = (10.0 ** (-SCALE_DECADES * np.arange(FEATURES) / (FEATURES - 1))).astype(np.float32)
SPECS = [("w", (CLASSES, FEATURES), "float32"), ("b", (CLASSES,), "float32")]


def _centres(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0xce]).standard_normal((CLASSES, FEATURES)) * CENTRE_SCALE


def client_data(seed: int, client: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, client, 0xda7a])
    y = rng.choice(CLASSES, size=n, p=rng.dirichlet(np.full(CLASSES, ALPHA)))
    return ((_centres(seed)[y] + rng.standard_normal((n, FEATURES))) * SCALES).astype(np.float32), y


@functools.lru_cache(maxsize=8)
def test_data(seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x7e57])
    y = rng.integers(0, CLASSES, n)
    x = ((_centres(seed)[y] + rng.standard_normal((n, FEATURES))) * SCALES).astype(np.float32)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def initial_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0x1417])
    return {"w": (rng.standard_normal((CLASSES, FEATURES)) * INIT_SCALE).astype(np.float32),
            "b": np.zeros(CLASSES, np.float32)}


def local_train(model, seed: int, client: int, num_examples: int, *, lr: float = 0.05, epochs: int = 1,
                batch: int = 32):
    x, y = client_data(seed, client, int(num_examples))
    return sgd(model, x, y, np.random.default_rng([seed, client, 0x5d]), lr=lr, epochs=epochs, batch=batch)


def accuracy(model, seed: int) -> float:
    x, y = test_data(seed)
    return float(np.mean(np.argmax(x @ model["w"].T + model["b"], axis=1) == y))
