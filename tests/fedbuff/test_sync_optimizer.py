"""Server optimizers applied at finalize of synchronous rounds (real server, real functions): each round
equals Flower's own strategy on the same client models; the state carries over rounds in shared memory."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from support import FlowerStep, expect
from lifl.client import Client
from lifl.layout import Layout
from lifl.engine.optimizers import ServerOptimizer, new_state, pingpong_nbytes, step, step_once

pytest.importorskip("flwr.server.strategy")

SHAPES = {"w": (40, 9), "b": (9,), "n": (3, 2, 5)}


@pytest.mark.parametrize("kind,kw,leaves,dtype", [
    ("fedadam", dict(lr=0.05), 2, np.float64),             # top folds children, steps
    ("fedavgm", dict(lr=0.7, momentum=0.9), 1, np.float64),  # one leaf: last fold + step
    ("fedadam", dict(lr=0.05), 1, np.float32),             # float32 model: float32 moments, as Flower keeps them
    ("fedyogi", dict(lr=0.05), 2, np.float32)])
def test_rounds_equal_flower_strategy(make_server, kind, kw, leaves, dtype):
    srv = make_server(leaves=leaves, workers=2)
    rng = np.random.default_rng(5)
    x = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    flower = FlowerStep(kind, x, **kw)
    opt = ServerOptimizer.of(kind, **kw)
    rid = 0
    with Client(srv.address) as c:
        for rnd in range(1, 4):
            clients = [({k: (v + rng.normal(scale=0.1, size=v.shape)).astype(dtype) for k, v in x.items()},
                        float(rng.integers(1, 30))) for _ in range(5)]
            rid = (c.open_round(x, expected=5, job="opt", optimizer=opt) if rnd == 1
                   else c.open_round(expected=5, job="opt", from_round=rid, optimizer=opt))
            ts = [threading.Thread(target=c.push, args=(rid, m, w, f"c{i}"), kwargs={"job": "opt"})
                  for i, (m, w) in enumerate(clients)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            got = c.pull(rid, wait_s=30, job="opt")
            ref = flower.round(rnd, clients)
            for k, r in ref.items():
                assert got[k].dtype == dtype
                np.testing.assert_allclose(got[k], r, rtol=1e-6, atol=1e-9 if dtype == np.float64 else 1e-7,
                                           err_msg=f"round {rnd}, {k}")
            x = {k: np.array(v) for k, v in got.items()}
        # a round with only a layout has no model to step from
        expect(grpc.StatusCode.INVALID_ARGUMENT, "steps from the round's initial model", c.open_round,
               layout=Layout.from_arrays(x), expected=1, job="opt2", optimizer=opt)


def test_step_once_is_idempotent_when_rerun():
    """A finalize re-run by a replacement function (the first one died after, or during, the step)
    gives the same model and leaves the state as one step would."""
    opt = ServerOptimizer.of("fedadam")
    n = 500
    rng = np.random.default_rng(0)
    buf = bytearray(pingpong_nbytes(opt, n))
    ref_state, x_ref = new_state(opt, n), rng.normal(size=n)
    x0 = x_ref.copy()
    for t in range(3):
        d = rng.normal(size=n)
        step(opt, ref_state, x_ref, d)
        xa, xb = x0.copy(), x0.copy()
        step_once(opt, buf, n, t, xa, d)
        step_once(opt, buf, n, t, xb, d)           # the same command again
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_allclose(xa, x_ref, rtol=1e-12)
        x0 = xa
    with pytest.raises(ValueError, match="at step 3, this step follows step 0"):
        step_once(opt, buf, n, 0, x0.copy(), d)
