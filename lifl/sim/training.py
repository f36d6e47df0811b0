"""Training mode: a small numpy model on a synthetic, non-IID task — and the contract for your own.

A *task* is a module (``run.task = "package.module"``, default this one) with
``SPECS`` (tensor name, shape, dtype), ``initial_model(seed)``,
``local_train(model, seed, client, num_examples, *, lr, epochs)`` returning the
trained arrays, and ``accuracy(model, seed)``. Real-mode client processes
import it by name, so it must be importable there too.

Softmax regression (10 classes, 32 features) on Gaussian class clusters;
each client's labels follow its own Dirichlet(0.5) class mix, so FedAvg has
real heterogeneity to average over. Local training is minibatch SGD; clients
report the trained weights and FedAvg averages them. Any other callable with
the signature of :func:`local_train` can replace it from Python.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import numpy as np

FEATURES, CLASSES = 32, 10
SPECS = [("w", (CLASSES, FEATURES), "float32"), ("b", (CLASSES,), "float32")]


def _centres(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0xce]).standard_normal((CLASSES, FEATURES)) * 0.3


def client_data(seed: int, client: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples of one client (features float32, labels int)."""
    rng = np.random.default_rng([seed, client, 0xda7a])
    mix = rng.dirichlet(np.full(CLASSES, 0.5))
    y = rng.choice(CLASSES, size=n, p=mix)
    x = _centres(seed)[y] + rng.standard_normal((n, FEATURES))
    return x.astype(np.float32), y


@functools.lru_cache(maxsize=8)   # read-only arrays: accuracy() is called after every server step
def test_data(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x7e57])
    y = rng.integers(0, CLASSES, n)
    x = (_centres(seed)[y] + rng.standard_normal((n, FEATURES))).astype(np.float32)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def initial_model(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.zeros((CLASSES, FEATURES), np.float32), "b": np.zeros(CLASSES, np.float32)}


def _grad(m, x, y):
    z = x @ m["w"].T + m["b"]
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return p.T @ x, p.sum(axis=0)


def local_train(model: dict[str, np.ndarray], seed: int, client: int, num_examples: int, *, lr: float = 0.05,
                epochs: int = 1, batch: int = 32) -> dict[str, np.ndarray]:
    """Train a copy of ``model`` on the client's data; returns the new weights."""
    x, y = client_data(seed, client, int(num_examples))
    return sgd(model, x, y, np.random.default_rng([seed, client, 0x5d]), lr=lr, epochs=epochs, batch=batch)


def sgd(model: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, lr: float,
        epochs: int, batch: int) -> dict[str, np.ndarray]:
    """Minibatch SGD of a softmax regression (``w``, ``b``) on a copy of ``model``: the step every task here uses."""
    m = {k: v.astype(np.float32).copy() for k, v in model.items()}
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for s in range(0, len(y), batch):
            idx = order[s:s + batch]
            gw, gb = _grad(m, x[idx], y[idx])
            m["w"] -= np.float32(lr) * gw.astype(np.float32)
            m["b"] -= np.float32(lr) * gb.astype(np.float32)
    return m


def accuracy(model: dict[str, np.ndarray], seed: int) -> float:
    x, y = test_data(seed)
    return float(np.mean(np.argmax(x @ model["w"].T + model["b"], axis=1) == y))


_CONTRACT = ("SPECS", "initial_model", "local_train", "accuracy")


def load_task(name: str) -> ModuleType:
    """Import a task module and check that it has the contract (module docstring)."""
    from .config import SimConfigError
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # whatever the user's import raised: name it
        raise SimConfigError(f"run.task: cannot import {name!r}: {type(e).__name__}: {e}") from None
    missing = [a for a in _CONTRACT if not hasattr(mod, a)]
    if missing:
        raise SimConfigError(f"run.task: {name!r} lacks {', '.join(missing)} (a task needs {', '.join(_CONTRACT)})")
    return mod
