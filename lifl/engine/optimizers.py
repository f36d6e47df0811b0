"""Server optimizers, float64, with their state in one flat buffer (shared memory or not).

A server optimizer moves the global model ``x`` along the round's (or FedBuff buffer's)
aggregated update ``d = mean − x`` (the negated pseudo-gradient)::

    sgd        x += lr·d                                   (lr = 1: plain FedAvg)
    fedavgm    m = μ·m + d;            x += lr·m
    fedadam    m = β1·m + (1−β1)·d;    v = β2·v + (1−β2)·d²
               x += lr·√(1−β2^(t+1))/(1−β1^(t+1)) · m/(√v + τ)
    fedyogi    m as fedadam;           v = v − (1−β2)·d²·sign(v − d²);  x += lr·m/(√v + τ)
    fedadagrad m as fedadam (β1 = 0);  v = v + d²;                       x += lr·m/(√v + τ)

``t`` is the 1-based step (round or published version). These are the updates of Flower's
``FedAvgM``, ``FedAdam``, ``FedYogi`` and ``FedAdagrad`` (flwr 1.x ``aggregate_fit``),
including FedAdam's bias correction with exponent ``t+1`` as Flower computes it, so a model
trained through LIFL follows the one Flower's strategy would produce (tests compare them to
<= 1e-6). Defaults per kind are Flower's defaults.

Why a flat buffer: between rounds/versions the state must outlive any one aggregator
function, so it lives in shared memory next to the accumulators. :func:`state_nbytes` says
how big, :func:`state_over` lays numpy views over any writable buffer (a ``SharedMemory``'s
``buf``, a ``bytearray``); the layout is ``[steps: uint64][m: float64·n][v: float64·n]``.
The step works in blocks so its temporaries stay in cache whatever the model size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from ..errors import LiflError

KINDS = ("sgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
_DEFAULTS: dict[str, dict[str, float]] = {   # Flower's defaults for each strategy
    "sgd": dict(lr=1.0),
    "fedavgm": dict(lr=1.0, momentum=0.0),
    "fedadam": dict(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9),
    "fedyogi": dict(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3),
    "fedadagrad": dict(lr=0.1, beta1=0.0, tau=1e-9),
}
_VECTORS = {"sgd": 0, "fedavgm": 1, "fedadam": 2, "fedyogi": 2, "fedadagrad": 2}
_BLOCK = 1 << 16       # elements per block: 512 KiB per float64 temporary
_HEADER = 8            # uint64 step counter, keeps the vectors 8-byte aligned


@dataclass(frozen=True)
class ServerOptimizer:
    """Which server optimizer, and its hyper-parameters (unused ones are ignored)."""
    kind: str = "sgd"
    lr: float = 1.0          # server learning rate (Flower's eta / server_learning_rate)
    momentum: float = 0.0    # fedavgm
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-9        # adaptivity (epsilon) of fedadam / fedyogi / fedadagrad

    @classmethod
    def of(cls, kind: str = "sgd", **overrides: float | None) -> "ServerOptimizer":
        """``kind`` with Flower's defaults for it, overridden by the non-None ``overrides``."""
        kind = (kind or "sgd").lower()
        if kind not in KINDS:
            raise LiflError("INVALID_ARGUMENT", f"unknown server optimizer {kind!r}; available: {', '.join(KINDS)}")
        known = {f.name for f in fields(cls)} - {"kind"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise LiflError("INVALID_ARGUMENT", f"unknown optimizer setting(s) {', '.join(unknown)}")
        values = {**_DEFAULTS[kind], **{k: float(v) for k, v in overrides.items() if v is not None}}
        return replace(cls(kind=kind), **values).validate()

    def validate(self) -> "ServerOptimizer":
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise LiflError("INVALID_ARGUMENT", f"server optimizer {self.kind}: {what}")
        need(self.kind in KINDS, f"unknown kind; available: {', '.join(KINDS)}")
        values = (self.lr, self.momentum, self.beta1, self.beta2, self.tau)
        need(all(math.isfinite(v) for v in values), "hyper-parameters must be finite")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
        need(self.tau > 0 or self.kind in ("sgd", "fedavgm"), f"tau must be > 0, got {self.tau}")
        return self

    @property
    def vectors(self) -> int:
        """float64 vectors of state per model element."""
        return _VECTORS[self.kind]

    @property
    def is_identity(self) -> bool:
        """True when the step returns the plain mean (sgd with lr 1): finalize may skip it."""
        return self.kind in ("sgd", "fedavgm") and self.lr == 1.0 and self.momentum == 0.0


@dataclass
class OptimizerState:
    """Views over a state buffer: ``steps`` taken so far, first and second moments."""
    steps: np.ndarray                  # uint64[1]
    m: np.ndarray | None               # float64[n]
    v: np.ndarray | None               # float64[n]

    @property
    def t(self) -> int:
        return int(self.steps[0])


def state_nbytes(opt: ServerOptimizer, n: int) -> int:
    """Bytes of state for a model of ``n`` float elements."""
    return _HEADER + 8 * opt.vectors * n


def state_over(opt: ServerOptimizer, buf, n: int, *, zero: bool = False) -> OptimizerState:
    """Views over ``buf`` (at least :func:`state_nbytes` bytes); ``zero`` starts a fresh state."""
    need = state_nbytes(opt, n)
    mv = memoryview(buf).cast("B")
    if len(mv) < need:
        raise ValueError(f"optimizer state needs {need} bytes, buffer has {len(mv)}")
    steps = np.frombuffer(mv, dtype=np.uint64, count=1)
    vecs = [np.frombuffer(mv, dtype=np.float64, count=n, offset=_HEADER + 8 * n * i) for i in range(opt.vectors)]
    if zero:
        steps[0] = 0
        for a in vecs:
            a.fill(0.0)
    m = vecs[0] if vecs else None
    v = vecs[1] if len(vecs) > 1 else None
    return OptimizerState(steps, m, v)


def new_state(opt: ServerOptimizer, n: int) -> OptimizerState:
    """A fresh state in private memory (tests, single-process use)."""
    return state_over(opt, bytearray(state_nbytes(opt, n)), n, zero=True)


def step(opt: ServerOptimizer, state: OptimizerState, x: np.ndarray, d: np.ndarray) -> None:
    """Apply one server step in place: ``x`` (float64) moves along ``d`` (float64, same size)."""
    _step(opt, state.t + 1, x, d, state.m, state.v, state.m, state.v)
    state.steps[0] = state.t + 1


def _step(opt: ServerOptimizer, t: int, x: np.ndarray, d: np.ndarray, m_in, v_in, m_out, v_out) -> None:
    """Step ``t`` (1-based): moments read from ``*_in``, written to ``*_out`` (the same arrays
    for an in-place step), in blocks so temporaries stay in cache."""
    if x.dtype != np.float64 or d.dtype != np.float64 or x.shape != d.shape or x.ndim != 1:
        raise ValueError("step takes two 1-D float64 arrays of the same size")
    k = opt.kind
    if k == "fedadam":
        lr = opt.lr * math.sqrt(1 - opt.beta2 ** (t + 1)) / (1 - opt.beta1 ** (t + 1))
    else:
        lr = opt.lr
    n = x.shape[0]
    tmp = np.empty(min(n, _BLOCK), dtype=np.float64)
    tmp2 = np.empty(min(n, _BLOCK), dtype=np.float64) if k == "fedyogi" else None
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        xs, ds, w = x[lo:hi], d[lo:hi], tmp[: hi - lo]
        if k == "sgd":
            np.multiply(ds, lr, out=w)
        elif k == "fedavgm":
            m = m_out[lo:hi]
            np.multiply(m_in[lo:hi], opt.momentum, out=m)
            m += ds
            np.multiply(m, lr, out=w)
        else:
            m, v, vi = m_out[lo:hi], v_out[lo:hi], v_in[lo:hi]
            np.multiply(m_in[lo:hi], opt.beta1, out=m)
            np.multiply(ds, 1.0 - opt.beta1, out=w)
            m += w
            np.multiply(ds, ds, out=w)                       # d²
            if k == "fedadam":
                w *= 1.0 - opt.beta2
                np.multiply(vi, opt.beta2, out=v)
                v += w
            elif k == "fedyogi":
                s = tmp2[: hi - lo]
                np.subtract(vi, w, out=s)
                np.sign(s, out=s)
                w *= s
                w *= 1.0 - opt.beta2
                np.subtract(vi, w, out=v)
            else:                                            # fedadagrad
                np.add(vi, w, out=v)
            np.sqrt(v, out=w)
            w += opt.tau
            np.divide(m, w, out=w)
            w *= lr
        xs += w


# -- exactly once: a double-buffered state for steps that a replacement function may re-run ----------
def pingpong_nbytes(opt: ServerOptimizer, n: int, itemsize: int = 8) -> int:
    """Bytes of a double-buffered state (:func:`step_once`): the step counter and two copies
    (moments of ``itemsize`` bytes: 8, or 4 for float32 models, as Flower keeps them)."""
    return _HEADER + 2 * itemsize * opt.vectors * n


def pingpong_views(opt: ServerOptimizer, buf, n: int, t_before: int = 0, dtype=np.float64):
    """(step counter, the moments of step ``t_before``, the copy step ``t_before + 1`` writes)
    over a double-buffered state; each a list of vectors of ``dtype`` (m, then v)."""
    dtype = np.dtype(dtype)
    mv = memoryview(buf).cast("B")
    need = pingpong_nbytes(opt, n, dtype.itemsize)
    if len(mv) < need:
        raise ValueError(f"optimizer state needs {need} bytes, buffer has {len(mv)}")
    steps = np.frombuffer(mv, dtype=np.uint64, count=1)
    size = dtype.itemsize * opt.vectors * n

    def copy(k: int) -> list[np.ndarray]:
        off = _HEADER + size * k
        return [np.frombuffer(mv, dtype=dtype, count=n, offset=off + dtype.itemsize * n * i)
                for i in range(opt.vectors)]
    return steps, copy(t_before % 2), copy((t_before + 1) % 2)


def step_once(opt: ServerOptimizer, buf, n: int, t_before: int, x: np.ndarray, d: np.ndarray) -> None:
    """Step ``t_before + 1`` over a double-buffered state, idempotent: it reads the copy of step
    ``t_before`` and writes the other, then commits the counter; a command re-run after a crash
    (or after its reply was lost) reads the same untouched copy and gives the same ``x``."""
    steps, src, dst = pingpong_views(opt, buf, n, t_before)
    if int(steps[0]) not in (t_before, t_before + 1):
        raise ValueError(f"optimizer state is at step {int(steps[0])}, this step follows step {t_before}")
    m_in, v_in = (src + [None, None])[:2]
    m_out, v_out = (dst + [None, None])[:2]
    _step(opt, t_before + 1, x, d, m_in, v_in, m_out, v_out)
    steps[0] = t_before + 1
