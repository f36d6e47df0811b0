"""Server optimizers against Flower's own strategies on the same client models, several rounds."""
from __future__ import annotations

import numpy as np
import pytest

from lifl.engine import optimizers as opt_mod
from lifl.engine.optimizers import ServerOptimizer, new_state, state_nbytes, state_over, step
from lifl.errors import LiflError

flwr_strategy = pytest.importorskip("flwr.server.strategy")
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

SHAPES = [(7, 3), (5,), (70001,)]      # the last one spans two optimizer blocks


def _flower(kind: str, initial, **kw):
    params = ndarrays_to_parameters(initial)
    if kind in ("sgd", "fedavgm"):
        return flwr_strategy.FedAvgM(initial_parameters=params, server_learning_rate=kw.get("lr", 1.0),
                                     server_momentum=kw.get("momentum", 0.0))
    cls = {"fedadam": flwr_strategy.FedAdam, "fedyogi": flwr_strategy.FedYogi,
           "fedadagrad": flwr_strategy.FedAdagrad}[kind]
    args = dict(initial_parameters=params)
    if "lr" in kw:
        args["eta"] = kw["lr"]
    if "tau" in kw:
        args["tau"] = kw["tau"]
    if kind != "fedadagrad":
        args.update({k_flwr: kw[k] for k, k_flwr in (("beta1", "beta_1"), ("beta2", "beta_2")) if k in kw})
    return cls(**args)


CASES = [
    ("sgd", dict(lr=0.7)),
    ("fedavgm", dict(lr=0.5, momentum=0.9)),
    ("fedadam", dict()),
    ("fedadam", dict(lr=0.03, beta1=0.8, beta2=0.95, tau=1e-3)),
    ("fedyogi", dict()),
    ("fedyogi", dict(lr=0.05, tau=1e-2)),
    ("fedadagrad", dict()),
    ("fedadagrad", dict(lr=0.02, tau=1e-4)),
]


@pytest.mark.parametrize("kind,kw", CASES)
def test_equals_flower_strategy_over_rounds(kind, kw):
    rng = np.random.default_rng(hash((kind, tuple(kw.items()))) % 2**32)
    initial = [rng.normal(size=s) for s in SHAPES]
    strategy = _flower(kind, initial, **kw)
    opt = ServerOptimizer.of(kind, **kw)
    n = sum(a.size for a in initial)
    state = state_over(opt, bytearray(state_nbytes(opt, n)), n, zero=True)
    x = np.concatenate([a.ravel() for a in initial])
    theirs = initial
    for rnd in range(1, 6):
        clients = [([a + rng.normal(scale=0.1, size=a.shape) for a in theirs], int(rng.integers(1, 50)))
                   for _ in range(4)]
        results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(m), k, {})) for m, k in clients]
        params, _ = strategy.aggregate_fit(rnd, results, [])
        theirs = parameters_to_ndarrays(params)
        # ours: float64 FedAvg of the same client models, then the step from x along mean - x
        total = sum(k for _, k in clients)
        mean = sum(np.concatenate([a.ravel() for a in m]) * k for m, k in clients) / total
        step(opt, state, x, mean - x)
        ref = np.concatenate([a.ravel() for a in theirs])
        np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-9)
        assert state.t == rnd


def test_state_lives_in_any_buffer_and_survives_reattach():
    """State over a shared buffer: two steps through one view equal a step, re-attach, a step."""
    opt = ServerOptimizer.of("fedadam")
    rng = np.random.default_rng(1)
    n = 1000
    d1, d2 = rng.normal(size=n), rng.normal(size=n)
    x_a = np.zeros(n)
    a = new_state(opt, n)
    step(opt, a, x_a, d1)
    step(opt, a, x_a, d2)
    buf = bytearray(state_nbytes(opt, n))
    x_b = np.zeros(n)
    step(opt, state_over(opt, buf, n, zero=True), x_b, d1)
    step(opt, state_over(opt, buf, n), x_b, d2)          # a later function attaches the same bytes
    np.testing.assert_array_equal(x_a, x_b)
    assert state_over(opt, buf, n).t == 2


def test_identity_and_sizes():
    assert ServerOptimizer.of("sgd").is_identity
    assert not ServerOptimizer.of("sgd", lr=0.5).is_identity
    assert state_nbytes(ServerOptimizer.of("sgd"), 10) == 8
    assert state_nbytes(ServerOptimizer.of("fedavgm", momentum=0.9), 10) == 8 + 80
    assert state_nbytes(ServerOptimizer.of("fedyogi"), 10) == 8 + 160


@pytest.mark.parametrize("kind,kw,msg", [
    ("adamw", {}, "unknown server optimizer"),
    ("fedadam", dict(lr=0.0), "lr must be > 0"),
    ("fedadam", dict(lr=float("nan")), "finite"),
    ("fedavgm", dict(momentum=1.0), "momentum"),
    ("fedyogi", dict(beta2=1.0), "beta1 and beta2"),
    ("fedadagrad", dict(tau=0.0), "tau must be > 0"),
    ("fedadam", dict(gamma=1.0), "unknown optimizer setting"),
])
def test_bad_settings_are_refused(kind, kw, msg):
    with pytest.raises(LiflError, match=msg) as e:
        ServerOptimizer.of(kind, **kw)
    assert e.value.code == "INVALID_ARGUMENT"


def test_short_buffer_and_wrong_arrays_are_refused():
    opt = ServerOptimizer.of("fedadam")
    with pytest.raises(ValueError, match="needs"):
        state_over(opt, bytearray(100), 10)
    st = new_state(opt, 4)
    with pytest.raises(ValueError, match="float64"):
        step(opt, st, np.zeros(4, np.float32), np.zeros(4))
    assert st.t == 0 and opt_mod.KINDS
