"""SWAD: dense stochastic weight averaging over a loss valley (Cha et al., NeurIPS 2021),
adapted to the local steps of one federated round.

Two layers, so the decision logic can be tested without tensors:

* :class:`ValleyDetector` -- pure logic over the sequence of held-out losses
  measured at checkpoints (one per *segment* of ``eval_every`` local steps).
* :class:`SWAD` -- the tensor side: accumulates every iterate of the current
  segment, keeps the few segments still undecided, and averages the ones the
  detector includes.  :class:`WeightAverager` is the exact running mean used.

Loss-valley rule (our precise statement of the reference algorithm, defaults
``n_converge=3, n_tolerance=6, tolerance_ratio=0.3``), with ``L_k`` the loss at
the end of segment ``k``:

1. *Convergence*: at the first checkpoint ``t >= n_converge - 1`` whose window
   ``L[t-n_converge+1 .. t]`` has its minimum at the window's first element
   (ties -> first), the valley starts at ``c = t - n_converge + 1`` and the
   threshold is ``mean(window) * (1 + tolerance_ratio)``.
2. *Tolerance*: from ``c`` on, segment ``k`` is included iff
   ``min(L[k .. k+n_tolerance-1]) <= threshold``; it is decided as soon as that
   window is complete.  The first ``k`` that fails kills the valley (*dead
   valley*): nothing after it is ever included.
3. *Final flush*: at the end of the round, undecided segments are decided in
   order over their truncated windows ``L[k .. end]``, stopping at the first
   failure.

The result is the dense mean of **all iterates** (weights after each step) of
the included segments; the valley is ``[start, end]`` in segment indices.

Differences to the reference, chosen for FL and documented: (a) averaging is
over iterates, not an unweighted mean of per-segment means (identical when
segments have equal length, which our trainer guarantees except possibly for
the last); (b) a round is short, so the loss may still be falling when it ends:
``fallback="tail"`` (default) then returns the dense mean of the last
``n_converge`` segments (SWA over the tail), ``fallback="last"`` returns the
plain final weights (the reference's behaviour).

BatchNorm policy (``bn_policy``): ``"average"`` averages running statistics
like any float tensor; ``"keep_last"`` keeps the last iterate's buffers;
``"recompute"`` re-estimates them with :func:`recompute_bn` on local data
(call it after :meth:`SWAD.finalize`).  Integer buffers (``num_batches_tracked``)
always keep the last iterate's value.  Our models use GroupNorm, which has no
statistics, so all three coincide for them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["SWADConfig", "ValleyDetector", "WeightAverager", "SWAD", "recompute_bn"]


@dataclass(frozen=True)
class SWADConfig:
    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    eval_every: int = 2          # local steps per segment
    eval_samples: int = 64       # local samples used for the valley loss
    fallback: str = "tail"       # "tail" | "last"
    bn_policy: str = "average"   # "average" | "keep_last" | "recompute"

    def __post_init__(self) -> None:
        if self.n_converge < 1 or self.n_tolerance < 1:
            raise ValueError("n_converge and n_tolerance must be >= 1")
        if self.tolerance_ratio < 0:
            raise ValueError("tolerance_ratio must be >= 0")
        if self.eval_every < 1:
            raise ValueError("eval_every must be >= 1")
        if self.fallback not in ("tail", "last"):
            raise ValueError(f"fallback must be 'tail' or 'last', got {self.fallback!r}")
        if self.bn_policy not in ("average", "keep_last", "recompute"):
            raise ValueError(f"bn_policy must be 'average', 'keep_last' or 'recompute', got {self.bn_policy!r}")


class ValleyDetector:
    """Pure loss-valley logic; see the module docstring for the rule."""

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3) -> None:
        self.n_converge, self.n_tolerance, self.ratio = n_converge, n_tolerance, tolerance_ratio
        self.losses: list[float] = []
        self.converged = False
        self.dead = False
        self.finished = False
        self.start: int | None = None
        self.end: int | None = None
        self.threshold: float | None = None
        self._next = 0  # first undecided segment (valid once converged)

    def observe(self, loss: float) -> list[int]:
        """Record the loss of the segment just closed; return segments newly included."""
        if self.finished:
            raise RuntimeError("observe() after finish()")
        self.losses.append(float(loss))
        if self.dead:
            return []
        t = len(self.losses) - 1
        if not self.converged:
            if t + 1 < self.n_converge:
                return []
            window = self.losses[t - self.n_converge + 1:]
            if min(range(len(window)), key=window.__getitem__) != 0:
                return []
            self.converged = True
            self.start = self._next = t - self.n_converge + 1
            self.threshold = sum(window) / len(window) * (1.0 + self.ratio)
        return self._decide(complete_only=True)

    def finish(self) -> list[int]:
        """End of training: decide the remaining segments over truncated windows."""
        out = [] if (self.finished or not self.converged or self.dead) else self._decide(complete_only=False)
        self.finished = True
        return out

    def _decide(self, complete_only: bool) -> list[int]:
        out = []
        t = len(self.losses) - 1
        while self._next <= t:
            k = self._next
            hi = k + self.n_tolerance
            if complete_only and hi - 1 > t:
                break
            if min(self.losses[k:hi]) <= self.threshold:
                out.append(k)
                self.end = k
                self._next += 1
            else:
                self.dead = True
                break
        return out

    @property
    def next_undecided(self) -> int:
        return self._next


class WeightAverager:
    """Exact running arithmetic mean of state dicts (float64 accumulation).

    Floating entries are averaged; non-floating entries (e.g. BatchNorm's
    ``num_batches_tracked``) keep the most recent value.
    """

    def __init__(self) -> None:
        self._sum: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._last: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor], weight: int = 1, presummed: bool = False) -> None:
        """Add one state (``weight`` copies) or, with ``presummed``, a sum of ``weight`` states."""
        for k, v in state.items():
            v = v.detach()
            if v.is_floating_point():
                contrib = v.to(torch.float64) * (1 if presummed else weight)
                if k in self._sum:
                    self._sum[k] += contrib
                else:
                    self._sum[k] = contrib.clone()
            else:
                self._last[k] = v.clone()
        self.count += weight

    def add_model(self, model: torch.nn.Module) -> None:
        self.add(model.state_dict())

    def merge(self, other: "WeightAverager") -> None:
        if other.count == 0:
            return
        self.add(other._sum, weight=other.count, presummed=True)
        self._last.update(other._last)

    def average(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("WeightAverager.average() with no states added")
        out = {k: s / self.count for k, s in self._sum.items()}
        out.update(self._last)
        return out


def _is_bn_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


class SWAD:
    """Streaming SWAD for one local round.

    Usage: call :meth:`on_step` after every optimizer step and
    :meth:`on_checkpoint` with the held-out loss every ``eval_every`` steps,
    then :meth:`finalize` to load the averaged weights into the model.
    """

    def __init__(self, config: SWADConfig | None = None) -> None:
        self.config = c = config or SWADConfig()
        self.detector = ValleyDetector(c.n_converge, c.n_tolerance, c.tolerance_ratio)
        self._segment = WeightAverager()
        self._pending: OrderedDict[int, WeightAverager] = OrderedDict()
        self._final = WeightAverager()
        self._included: list[int] = []

    def on_step(self, model: torch.nn.Module) -> None:
        self._segment.add_model(model)

    def on_checkpoint(self, val_loss: float) -> None:
        if self._segment.count == 0:
            raise RuntimeError("on_checkpoint() without any on_step() since the last checkpoint")
        idx = len(self.detector.losses)
        self._pending[idx] = self._segment
        self._segment = WeightAverager()
        self._include(self.detector.observe(val_loss))
        self._prune()

    def _include(self, idxs: list[int]) -> None:
        for k in idxs:
            self._final.merge(self._pending.pop(k))
            self._included.append(k)

    def _prune(self) -> None:
        det = self.detector
        if det.dead:
            self._pending.clear()
        elif det.converged:
            for k in [k for k in self._pending if k < det.next_undecided]:
                del self._pending[k]
        else:  # only the last n_converge segments can still start a valley (or feed the fallback)
            while len(self._pending) > self.config.n_converge:
                self._pending.popitem(last=False)

    def finalize(self, model: torch.nn.Module) -> dict:
        """Load the SWAD weights into ``model``; return a report of what happened."""
        det = self.detector
        self._include(det.finish())
        last = {k: v.detach().clone() for k, v in model.state_dict().items()}
        fallback = None
        if self._final.count > 0:
            avg = self._final.average()
        elif self.config.fallback == "tail" and self._pending:
            fallback = "tail"
            tail = WeightAverager()
            for seg in self._pending.values():
                tail.merge(seg)
            avg = tail.average()
        else:
            fallback = "last"
            avg = last
        if self.config.bn_policy == "keep_last":
            avg = {k: (last[k] if _is_bn_buffer(k) else v) for k, v in avg.items()}
        model.load_state_dict({k: v.to(dtype=last[k].dtype) for k, v in avg.items()})
        return {
            "swad_converged": float(det.converged),
            "swad_dead_valley": float(det.dead),
            "swad_start": float(-1 if det.start is None else det.start),
            "swad_end": float(-1 if det.end is None else det.end),
            "swad_segments": float(len(det.losses)),
            "swad_segments_averaged": float(len(self._included)),
            "swad_iterates_averaged": float(self._final.count),
            "swad_fallback": {None: 0.0, "tail": 1.0, "last": 2.0}[fallback],
        }


@torch.no_grad()
def recompute_bn(model: torch.nn.Module, batches) -> None:
    """Re-estimate BatchNorm running statistics with a cumulative average over ``batches``."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m in bns:
        m.momentum = momenta[m]
    model.train(was_training)
