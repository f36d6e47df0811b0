"""A server optimizer's step fused into finalize: one pass over the float64 sum.

Why: a separate step (convert the base model to float64, form ``d``, step in blocked numpy
passes, finalize ``x``) reads and writes the model-sized vectors several times; here each piece
of the sum is turned into ``x`` while it is still in cache, by one C kernel that reads the sum,
the base and the optimizer state and writes the new state and the model (``_foldc.opt_step``).
Arithmetic is float64 throughout; it agrees with :func:`lifl.engine.optimizers.step` to ~1e-15 (the
mean is formed as ``sum·(1/Σw)``).

Two modes:

- *round* (synchronous rounds): ``d = Σwx/Σw − x₀`` with ``x₀`` the round's initial model in its
  own dtypes; the result is ``x`` in those dtypes.
- *delta* (asynchronous jobs): ``d = ΣwsΔ/Σw`` (the sum already holds the deltas, ``Σw`` is the
  raw weight), ``x₀`` is the job's float64 master copy; ``x`` goes both to the version's segment
  (model dtypes) and to the other float64 master copy.

Exactly once: the state is double buffered (:func:`lifl.engine.optimizers.pingpong_nbytes`) and the
master copy too, so a step re-run after its function died (or its reply was lost) reads the same
untouched inputs and writes the same bytes; :func:`commit` advances the step counter last.
Pieces are independent, so spans of one step may run in different functions.
"""
from __future__ import annotations

import bisect
import math

import numpy as np

from .engine.optimizers import ServerOptimizer, _step, pingpong_nbytes, pingpong_views
from .fold import _as_f64, _tensor_ranges, mean_into
from .layout import Layout, kernel_id

try:
    from . import _foldc
except ImportError:  # pragma: no cover - built at install time when a C compiler exists
    _foldc = None

_OPS = {"sgd": 0, "fedavgm": 1, "fedadam": 2, "fedyogi": 3, "fedadagrad": 4}
_FAST = (0, 1)         # kernel ids of float32 and float64 tensors: the C kernel's outputs


def state_dtype(layout: Layout) -> str:
    """The moments' type: float32 when no tensor is wider (as Flower keeps FedAdam's ``m``/``v``
    in the parameters' dtype), else float64. Arithmetic is float64 either way; float32 moments
    halve the state's memory traffic, the step's main cost, and differ from float64 moments by
    rounding (~6e-8 relative) that the step then scales by ``lr``."""
    wide = any(s.dtype in ("float64", "int64", "uint64", "int32", "uint32") for s in layout.specs if s.numel > 1)
    return "float64" if wide else "float32"


def state_nbytes(opt: ServerOptimizer, layout: Layout) -> int:
    """Bytes of a double-buffered state for ``layout`` (:func:`state_dtype` moments)."""
    return pingpong_nbytes(opt, layout.numel, np.dtype(state_dtype(layout)).itemsize)


def step_lr(opt: ServerOptimizer, t: int) -> float:
    """The learning rate of step ``t`` (1-based): FedAdam's carries Flower's bias correction."""
    if opt.kind == "fedadam":
        return opt.lr * math.sqrt(1 - opt.beta2 ** (t + 1)) / (1 - opt.beta1 ** (t + 1))
    return opt.lr


def _steps(state_buf) -> np.ndarray:
    return np.frombuffer(state_buf, np.uint64, 1)


def check_before(state_buf, t_before: int) -> None:
    """Refuse a step that does not follow the state's committed step (nor re-runs it)."""
    steps = _steps(state_buf)
    if int(steps[0]) not in (t_before, t_before + 1):
        raise ValueError(f"optimizer state is at step {int(steps[0])}, this step follows step {t_before}")


def commit(state_buf, t_before: int) -> None:
    """The step's every piece is written: the state is now at ``t_before + 1``."""
    _steps(state_buf)[0] = t_before + 1


def step_writer(opt: ServerOptimizer, layout: Layout, t_before: int, total_weight: float, state_buf, out_buf,
                base_buf=None, master: tuple[np.ndarray, np.ndarray] | None = None, moments: str = "float64"):
    """``write(piece, e0, e1)``: step elements [e0, e1) of the sum (``piece``, float64) and write
    the model's elements there into ``out_buf`` (model dtypes). Round mode takes ``base_buf`` (the
    initial model, flat layout); delta mode takes ``master = (x_in, x_out)`` (float64 vectors).
    ``moments``: the state's type (:func:`state_dtype`)."""
    if not total_weight > 0:
        raise ValueError(f"total weight must be > 0, got {total_weight}")
    n, t = layout.numel, t_before + 1
    _, src, dst = pingpong_views(opt, state_buf, n, t_before, moments)
    skind = 1 if moments == "float64" else 0
    m_in, v_in = (src + [None, None])[:2]
    m_out, v_out = (dst + [None, None])[:2]
    lr, op, delta = step_lr(opt, t), _OPS[opt.kind], master is not None
    starts, ends = _tensor_ranges(layout)
    outs = [v.reshape(-1) for v in layout.views(out_buf).values()]
    bases = [v.reshape(-1) for v in layout.views(base_buf, public=False).values()] if not delta else None

    def one(piece: np.ndarray, i: int, a: int, b: int) -> None:
        spec, t0 = layout.specs[i], starts[i]
        sl = slice(a, b)
        mi, vi = (None if m_in is None else m_in[sl]), (None if v_in is None else v_in[sl])
        mo, vo = (None if m_out is None else m_out[sl]), (None if v_out is None else v_out[sl])
        base = master[0][sl] if delta else bases[i][a - t0:b - t0]
        out = outs[i][a - t0:b - t0]
        kid = kernel_id(spec.dtype)
        if _foldc is not None and kid in _FAST:
            _foldc.opt_step(op, piece, total_weight, base, out, kid, master[1][sl] if delta else None,
                            mi, vi, mo, vo, skind, delta, lr, opt.momentum, opt.beta1, opt.beta2, opt.tau)
            return
        x = np.array(base, np.float64) if delta else _as_f64(base, kid)   # other dtypes: numpy, same math
        d = piece / total_weight
        if not delta:
            d -= x
        if skind == 0 and mi is not None:    # float32 moments: the same float64 math on copies
            m64, v64 = mi.astype(np.float64), (None if vi is None else vi.astype(np.float64))
            _step(opt, t, x, d, m64, v64, m64, v64)
            mo[...] = m64
            if vo is not None:
                vo[...] = v64
        else:
            _step(opt, t, x, d, mi, vi, mo, vo)
        if delta:
            master[1][sl] = x
        mean_into(x, spec, 1.0, out)

    def write(piece: np.ndarray, e0: int, e1: int) -> None:
        i = bisect.bisect_right(starts, e0) - 1
        while i < len(starts) and starts[i] < e1:
            a, b = max(e0, starts[i]), min(e1, ends[i])
            if a < b:
                one(piece[a - e0:b - e0], i, a, b)
            i += 1
    return write

