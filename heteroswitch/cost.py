"""What a client really spends: FLOP counts and measured device-seconds per phase.

Why: counting SGD steps alone made always-on ISP look free although it cost a
third more training time.  Every phase a remedy adds is counted here:

* ``sgd``        forward + backward + optimizer step of every local batch
* ``probe``      the bias probe (a forward pass of the received model on local
                 samples) and, for the per-client choice, the colour probe
                 (ISP on the probe samples + one more forward pass)
* ``isp``        the random ISP transformation of training images
* ``swad_avg``   SWAD's dense weight averaging (one accumulate per step, the
                 merges of finished segments and the final mean)
* ``swad_eval``  SWAD's valley losses (forward passes on local samples)

**FLOPs** (:class:`FlopCounter`): counted by running the real code under a
torch dispatch mode: matmul/convolution ops with torch's own formulas
(``torch.utils.flop_counter``: 2 per multiply-accumulate, backward included),
every other floating-point op as one FLOP per output element (element-wise
convention: ReLU, GroupNorm, the optimizer's updates, every ISP stage);
views, copies and allocations are free.  Unit costs (one training step, one
forward sample, one ISP image, one SWAD accumulate) are counted once per
shape on a CPU copy and cached (:class:`CostModel`); a client-round's FLOPs
are the phase counts times the unit costs, so counting never slows training.

**Device-seconds** (:class:`PhaseTimer`): CUDA events around each phase on a
GPU (read once at the end of the round, no per-step host synchronisation),
``time.perf_counter`` on a CPU.  When several processes share one GPU the
events include time spent waiting for the others; the bench therefore also
measures each mode alone, interleaved (``benchmarks/bench_heteroswitch_cost.py``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .swad import WeightAverager

__all__ = ["PHASES", "FlopCounter", "count_flops", "UnitCosts", "CostModel", "PhaseTimer", "round_flops"]

PHASES: tuple[str, ...] = ("sgd", "probe", "isp", "swad_avg", "swad_eval")

_aten = torch.ops.aten
_FREE = {
    _aten.clone, _aten.copy_, _aten._to_copy, _aten.empty_like, _aten.zeros_like, _aten.ones_like,
    _aten.empty, _aten.zeros, _aten.ones, _aten.full, _aten.new_empty, _aten.new_zeros, _aten.new_ones,
    _aten.fill_, _aten.zero_, _aten.detach, _aten.lift_fresh, _aten.alias, _aten.index, _aten.index_select,
    _aten.cat, _aten.stack, _aten.empty_strided, _aten.scalar_tensor, _aten._local_scalar_dense, _aten.arange,
    _aten.where, _aten.masked_fill, _aten.lift_fresh_copy, _aten._unsafe_view, _aten.view, _aten.expand,
}


def _float_numel(xs) -> int:
    return sum(t.numel() for t in tree_flatten(xs)[0] if isinstance(t, torch.Tensor) and t.is_floating_point())


class FlopCounter(TorchDispatchMode):
    """Dispatch mode that adds up ``matmul`` (torch's formulas) and ``elementwise`` FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.matmul = 0
        self.elementwise = 0

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        pkt = func._overloadpacket
        if pkt in flop_registry:
            self.matmul += int(flop_registry[pkt](*args, **kwargs, out_val=out))
        elif pkt not in _FREE and not func.is_view:
            n = _float_numel(out)
            if n == 0 and args:  # in-place foreach ops return nothing: count what they wrote
                n = _float_numel(args[0])
            self.elementwise += n
        return out


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """Run ``fn(*args, **kwargs)`` under :class:`FlopCounter`; return (FLOPs, result)."""
    with FlopCounter() as c:
        r = fn(*args, **kwargs)
    return c.total, r


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs of one unit of each phase (one batch, one sample, one image, one accumulate)."""

    train_step: int        # forward + backward + optimizer step of one batch
    forward_sample: int    # one sample's forward pass (eval mode)
    isp_image: int         # the random ISP transformation of one image
    swad_accumulate: int   # adding one state to a float64 running sum


def round_flops(units: UnitCosts, counts: dict[str, float]) -> dict[str, float]:
    """FLOPs per phase of one client-round from its counts (a pure function).

    ``counts``: ``train_steps``, ``probe_samples``, ``isp_images`` (training),
    ``probe_isp_images``, ``swad_eval_samples`` (SWAD valley), ``swad_accumulates``.
    """
    g = lambda k: float(counts.get(k, 0.0))  # noqa: E731
    out = {
        "sgd": g("train_steps") * units.train_step,
        "probe": g("probe_samples") * units.forward_sample + g("probe_isp_images") * units.isp_image,
        "isp": g("isp_images") * units.isp_image,
        "swad_avg": g("swad_accumulates") * units.swad_accumulate,
        "swad_eval": g("swad_eval_samples") * units.forward_sample,
    }
    out["total"] = sum(out.values())
    return out


class CostModel:
    """Unit FLOP costs, counted once per (architecture, batch shape, optimizer, ISP config) and cached."""

    def __init__(self) -> None:
        self._cache: dict[tuple, UnitCosts] = {}

    def units(self, model: torch.nn.Module, batch_shape: tuple[int, ...], lr: float, momentum: float,
              weight_decay: float, isp=None, multilabel: bool = False, num_outputs: int | None = None) -> UnitCosts:
        arch = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
        key = (type(model).__name__, arch, tuple(batch_shape), momentum > 0, weight_decay > 0,
               None if isp is None else repr(isp.config), multilabel)
        if key not in self._cache:
            self._cache[key] = self._count(model, batch_shape, lr, momentum, weight_decay, isp, multilabel)
        return self._cache[key]

    @staticmethod
    def _count(model, batch_shape, lr, momentum, weight_decay, isp, multilabel) -> UnitCosts:
        m = copy.deepcopy(model).to("cpu").float()
        m.train()
        b = batch_shape[0]
        x = torch.rand(*batch_shape)
        with torch.no_grad():
            k = m(x[:1]).shape[1]
        y = (torch.rand(b, k) < 0.2).float() if multilabel else torch.randint(0, k, (b,))
        loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

        def step():
            loss = loss_fn(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # the first step allocates the momentum buffers; count the steady state
        train_step, _ = count_flops(step)
        m.eval()
        with torch.no_grad():
            fwd, _ = count_flops(m, x[:1])
        isp_image = 0
        if isp is not None:
            g = torch.Generator().manual_seed(0)
            isp_image, _ = count_flops(isp, torch.rand(1, *batch_shape[1:]), g)
        avg = WeightAverager()
        avg.add_model(m)
        acc, _ = count_flops(avg.add_model, m)
        return UnitCosts(train_step, fwd, isp_image, acc)


class PhaseTimer:
    """Device-seconds per phase: ``with timer.phase("isp"): ...``; :meth:`seconds` reads them once.

    On CUDA each phase interval is a pair of events on the current stream (no
    host synchronisation until :meth:`seconds`); elsewhere wall time.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: dict[str, list] = {}
        self._wall: dict[str, float] = {}

    def phase(self, name: str) -> "_Phase":
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {PHASES}")
        return _Phase(self, name)

    def seconds(self) -> dict[str, float]:
        out = {p: self._wall.get(p, 0.0) for p in PHASES}
        if self.cuda and self._events:
            torch.cuda.synchronize()
            for p, pairs in self._events.items():
                out[p] += sum(a.elapsed_time(b) for a, b in pairs) / 1000.0
        out["total"] = sum(out[p] for p in PHASES)
        return out


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.t, self.name = timer, name

    def __enter__(self) -> None:
        if self.t.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._s = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.t.cuda:
            b = torch.cuda.Event(enable_timing=True)
            b.record()
            self.t._events.setdefault(self.name, []).append((self._a, b))
        else:
            self.t._wall[self.name] = self.t._wall.get(self.name, 0.0) + time.perf_counter() - self._s
