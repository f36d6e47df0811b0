"""The server step fused into finalize (lifl.serverstep, the C kernel and its numpy fallback) against
an independent float64 reference written out here: every optimizer, both modes (a round's mean, an
asynchronous buffer's deltas), mixed dtypes across piece boundaries, float64 and float32 moments,
and a re-run that writes the same bytes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lifl import fold, serverstep
from lifl.engine.optimizers import ServerOptimizer
from lifl.layout import Layout, public_dtype

ml_dtypes = pytest.importorskip("ml_dtypes")

# crosses piece boundaries (fold.PIECE elements) inside and between tensors
MIXED = {"w": ((400, 500), np.float32), "b": ((70001,), np.float64), "n": ((9,), np.int64),
         "h": ((1000,), np.float16), "z": ((513,), ml_dtypes.bfloat16), "c": ((), np.int64)}
NARROW = {"w": ((400, 500), np.float32), "h": ((1000,), np.float16), "c": ((), np.int64)}


def _arrays(shapes, rng, scale=1.0):
    out = {}
    for k, (s, dt) in shapes.items():
        if np.dtype(dt).kind == "i":
            out[k] = rng.integers(-50, 50, size=s).astype(dt)
        else:
            out[k] = (rng.normal(size=s) * scale).astype(dt)
    return out


def _f64(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays.values()])


def _ref_step(kind: str, kw: dict, t: int, x: np.ndarray, d: np.ndarray, m, v):
    """Flower's FedAvgM / FedAdam / FedYogi / FedAdagrad updates, float64, written independently."""
    lr = kw["lr"]
    if kind == "sgd":
        return x + lr * d, m, v
    if kind == "fedavgm":
        m = kw["momentum"] * m + d
        return x + lr * m, m, v
    b1, b2, tau = kw.get("beta1", 0.9), kw.get("beta2", 0.99), kw["tau"]
    if kind == "fedadagrad":
        b1 = 0.0
    m = b1 * m + (1 - b1) * d
    if kind == "fedadam":
        v = b2 * v + (1 - b2) * d * d
        lr = lr * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
    elif kind == "fedyogi":
        v = v - (1 - b2) * d * d * np.sign(v - d * d)
    else:
        v = v + d * d
    return x + lr * m / (np.sqrt(v) + tau), m, v


def _published(x: np.ndarray, like: dict) -> dict:
    """``x`` in each tensor's dtype: floats cast, integers rounded to nearest and clipped."""
    out, pos = {}, 0
    for k, a in like.items():
        part = x[pos:pos + a.size].reshape(a.shape)
        if a.dtype.kind == "i":
            info = np.iinfo(a.dtype)
            out[k] = np.clip(np.rint(part), info.min, info.max).astype(a.dtype)
        else:
            out[k] = part.astype(a.dtype)
        pos += a.size
    return out


KINDS = [("sgd", dict(lr=0.7)), ("fedavgm", dict(lr=0.5, momentum=0.9)), ("fedadam", dict(lr=0.03, tau=1e-3)),
         ("fedyogi", dict(lr=0.05, tau=1e-2)), ("fedadagrad", dict(lr=0.02, tau=1e-4))]


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("shapes,delta", [(MIXED, False), (MIXED, True), (NARROW, False), (NARROW, True)])
def test_steps_equal_an_independent_float64_reference(kind, kw, shapes, delta):
    rng = np.random.default_rng(len(kind) * 7 + delta)
    x0 = _arrays(shapes, rng)
    layout = Layout.from_arrays(x0)
    n = layout.numel
    moments = serverstep.state_dtype(layout)
    assert moments == ("float32" if shapes is NARROW else "float64")
    opt = ServerOptimizer.of(kind, **kw)
    state = bytearray(serverstep.state_nbytes(opt, layout))
    base = bytearray(layout.total_size)
    for k, v in layout.views(base).items():
        v[...] = x0[k]
    masters = (_f64(x0), np.empty(n))
    x_ref, m, v = _f64(x0), np.zeros(n), np.zeros(n)
    for t in range(3):
        w = float(rng.integers(1, 30))
        target = rng.normal(scale=0.1, size=n) + (0 if delta else x_ref)
        acc = target * w                                    # the tree's float64 sum
        d = acc / w - (0 if delta else _f64(_published(x_ref, x0)))   # round mode: from the published model
        x_ref, m, v = _ref_step(kind, kw, t + 1, x_ref if delta else _f64(_published(x_ref, x0)), d, m, v)
        outs = []
        for run in range(2):    # the same command twice (a replacement function re-runs it): same bytes
            serverstep.check_before(state, t)
            out = bytearray(layout.total_size)
            write = serverstep.step_writer(opt, layout, t, w, state, out, base_buf=None if delta else base,
                                           master=masters if delta else None, moments=moments)
            fold.finalize_span(layout, 0, n, [acc], None, w, out, write)
            outs.append(bytes(out))
            if run == 0:
                serverstep.commit(state, t)     # committed, then re-run: the check lets a re-run through
        assert outs[0] == outs[1]
        got = layout.views(out)
        # float32 moments: rounded to ~6e-8 of |m| each step, so x is within ~1e-8 absolute of the
        # float64 reference (model entries are O(1)); relative only away from zero
        rtol, atol = (1e-12, 1e-9) if moments == "float64" else (1e-6, 1e-7)
        want = _published(x_ref, x0)
        for k in x0:
            if x0[k].dtype.kind == "i":
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"step {t + 1}, {k}")
            else:   # the reference rounded once to the tensor's dtype: within an ulp of it
                ulp = float(np.finfo(public_dtype(layout.specs[list(x0).index(k)].dtype)).eps)
                np.testing.assert_allclose(np.asarray(got[k], np.float64), np.asarray(want[k], np.float64),
                                           rtol=max(rtol, 2 * ulp), atol=atol, err_msg=f"step {t + 1}, {k}")
        if delta:
            np.testing.assert_allclose(masters[1], x_ref, rtol=rtol, atol=atol)
            masters = (masters[1], masters[0])
        else:
            base[:] = out
            x_ref = _f64(_published(x_ref, x0))
    with pytest.raises(ValueError, match="at step 3, this step follows step 0"):
        serverstep.check_before(state, 0)


def test_zero_total_weight_is_refused():
    layout = Layout.from_arrays({"w": np.zeros(3, np.float32)})
    opt = ServerOptimizer.of("fedadam")
    with pytest.raises(ValueError, match="total weight must be > 0"):
        serverstep.step_writer(opt, layout, 0, 0.0, bytearray(serverstep.state_nbytes(opt, layout)),
                               bytearray(layout.total_size), base_buf=bytearray(layout.total_size))
