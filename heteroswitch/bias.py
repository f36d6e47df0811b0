"""Per-client device-bias signal from loss dynamics, and the switch it drives.

The signal (our choice; the paper's exact formula was not available): the loss
of the *received* global model on the client's local data, relative to a
reference loss,

    signal = loss_global / loss_ref - 1

A client whose data the global model serves worse than average (signal > 0)
is one the model is biased *against* -- in the device benchmark, typically a
minority or old device.  The reference is, in order of preference:

* ``"server"``: a loss the server broadcasts (in the bench: the
  example-weighted mean of the pre-training losses clients reported last
  round), which compares clients with each other;
* ``"ema"``: the client's own exponential moving average of past
  ``loss_global`` values (for clients that participate repeatedly), which
  compares the client with its own history;
* none yet: ``default_level`` is used and the reason says so.

The server reference (:class:`ServerReference`, our choice): the **median** of
the pre-training losses the clients of the last round reported (robust to the
few clients whose data the model serves very badly -- exactly the ones we
want to flag -- and to label skew outliers), smoothed across rounds by an EMA
(``ref_decay``), so that one unusual round does not flip every client's level
(thrash).  A relative signal (ratio, not difference) keeps the thresholds
meaningful while the loss falls by an order of magnitude during training.

Hysteresis (``hysteresis``, default 0.05): a client that was at level L at its
last participation stays at L while its signal is within ``hysteresis`` below
L's threshold; it drops only when the signal falls clearly below.  Clients
participate rarely, so this mostly matters for small federations; it is there
to avoid thrash, not to tune results.

Levels: ``level = #{t in thresholds : signal >= t}``, and ``modes[level]``
says which remedies are on.  Defaults: ``thresholds = (-0.15, 0.5)`` and
modes ``0 -> nothing``, ``1 -> ISP transformation``, ``2 -> ISP + SWAD``
(ISP first because it costs no extra forward passes; SWAD costs valley
evaluations).  Calibration (documented in docs/heteroswitch.md): relative
to the round's median loss, a client whose loss is at least 85 % of the
median gets ISP (measured: 51-57 % of client-rounds, more often on the
minority devices than on the majority one), and one whose loss is 1.5x
the median (the clearly under-served tail) also gets SWAD.  The first
threshold is set below 0 because ISP transformation is cheap and the
harm of missing a biased client is larger than the harm of augmenting an
unbiased one; chosen on seen devices only (never on the unseen device).

Per-client choice of the remedy (``colour_threshold``, off by default): a
second, lazily measured signal says *which kind* of bias a flagged client
has.  The colour signal is ``loss(model, ISP(x)) / loss(model, x) - 1`` on
the same probe samples: how much the random ISP transformation hurts the
received model on this client's data.  Large (> ``colour_threshold``): true
colour carries signal the model uses here (a well-calibrated phone), so
randomising white balance and gamma would destroy it -- the client gets SWAD
instead of ISP.  Small or negative: the client's colours are already off the
model's (a colour-cast phone) and ISP diversification is the remedy.  So a
client ends at none, ISP, SWAD or ISP+SWAD.  The colour probe is measured
only for clients at level >= 1 and costs one ISP pass and one forward pass
on the probe samples (counted in :mod:`heteroswitch.cost`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["Mode", "SwitchConfig", "Decision", "BiasSwitch", "ServerReference", "relative_excess_loss", "level_for",
           "choose_mode"]


@dataclass(frozen=True)
class Mode:
    isp: bool = False
    swad: bool = False

    @property
    def name(self) -> str:
        return "+".join(n for n, on in (("isp", self.isp), ("swad", self.swad)) if on) or "none"


@dataclass(frozen=True)
class SwitchConfig:
    thresholds: tuple[float, ...] = (-0.15, 0.5)
    modes: tuple[Mode, ...] = (Mode(False, False), Mode(True, False), Mode(True, True))
    reference: str = "server"      # "server" | "ema"
    ema_decay: float = 0.7
    default_level: int = 0
    hysteresis: float = 0.05
    ref_statistic: str = "median"  # server reference over last round's losses: "median" | "mean"
    ref_decay: float = 0.5         # EMA of the server reference across rounds (0 = last round only)
    colour_threshold: float | None = None  # per-client choice: ISP -> SWAD when ISP hurts the model this much

    def __post_init__(self) -> None:
        if list(self.thresholds) != sorted(self.thresholds):
            raise ValueError(f"thresholds must be non-decreasing, got {self.thresholds}")
        if len(self.modes) != len(self.thresholds) + 1:
            raise ValueError(f"need len(thresholds) + 1 = {len(self.thresholds) + 1} modes, got {len(self.modes)}")
        if self.reference not in ("server", "ema"):
            raise ValueError(f"reference must be 'server' or 'ema', got {self.reference!r}")
        if not 0 <= self.default_level < len(self.modes):
            raise ValueError(f"default_level must index modes, got {self.default_level}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if not 0.0 <= self.ref_decay < 1.0:
            raise ValueError("ref_decay must be in [0, 1)")
        if self.hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {self.hysteresis}")
        if self.colour_threshold is not None and not self.colour_threshold > -1.0:
            raise ValueError(f"colour_threshold must be > -1 (a relative loss change), got {self.colour_threshold}")
        if self.ref_statistic not in ("median", "mean"):
            raise ValueError(f"ref_statistic must be 'median' or 'mean', got {self.ref_statistic!r}")


@dataclass(frozen=True)
class Decision:
    level: int
    mode: Mode
    signal: float | None
    loss_global: float | None
    loss_ref: float | None
    reason: str
    colour_signal: float | None = None

    def as_metrics(self, prefix: str = "hs_") -> dict[str, float]:
        """Flat numeric metrics, so the server can see who switched and why."""
        nan = float("nan")
        return {
            f"{prefix}level": float(self.level),
            f"{prefix}isp": float(self.mode.isp),
            f"{prefix}swad": float(self.mode.swad),
            f"{prefix}signal": nan if self.signal is None else float(self.signal),
            f"{prefix}loss_global": nan if self.loss_global is None else float(self.loss_global),
            f"{prefix}loss_ref": nan if self.loss_ref is None else float(self.loss_ref),
            f"{prefix}has_ref": float(self.loss_ref is not None),
            f"{prefix}colour_signal": nan if self.colour_signal is None else float(self.colour_signal),
        }


def relative_excess_loss(loss_global: float, loss_ref: float) -> float:
    if loss_ref <= 0:
        raise ValueError(f"reference loss must be > 0, got {loss_ref}")
    return loss_global / loss_ref - 1.0


def level_for(signal: float, thresholds: tuple[float, ...]) -> int:
    return bisect.bisect_right(list(thresholds), signal)


def choose_mode(mode: Mode, colour_signal: float | None, colour_threshold: float | None) -> Mode:
    """The per-client choice: a level's mode with ISP swapped for SWAD when the
    colour signal says ISP would destroy signal the model uses (pure)."""
    if colour_threshold is None or colour_signal is None or not mode.isp or colour_signal <= colour_threshold:
        return mode
    return Mode(isp=False, swad=True)


class ServerReference:
    """The server-broadcast reference loss: a robust statistic (median by
    default) of the pre-training losses clients reported in a round, smoothed
    across rounds by an EMA.  ``value`` is ``None`` until the first update."""

    def __init__(self, config: SwitchConfig | None = None) -> None:
        self.config = config or SwitchConfig()
        self.value: float | None = None

    def update(self, losses, weights=None) -> float | None:
        import numpy as np

        x = np.asarray([v for v in losses], dtype=np.float64)
        ok = np.isfinite(x)
        if not ok.any():
            return self.value
        w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
        x, w = x[ok], w[ok]
        if self.config.ref_statistic == "mean":
            r = float(np.average(x, weights=w))
        else:  # weighted median
            o = np.argsort(x)
            cw = np.cumsum(w[o])
            r = float(x[o][np.searchsorted(cw, 0.5 * cw[-1])])
        d = self.config.ref_decay
        self.value = r if self.value is None else d * self.value + (1 - d) * r
        return self.value


class BiasSwitch:
    """Stateful per-client switch (state: the EMA of its own global-model
    losses and the level of its last decision, for hysteresis)."""

    def __init__(self, config: SwitchConfig | None = None, ema: float | None = None) -> None:
        self.config = config or SwitchConfig()
        self.ema = ema
        self.last_level: int | None = None

    def decide(self, loss_global: float | None, server_ref: float | None = None, colour_signal=None) -> Decision:
        """Decide this round's mode.  ``colour_signal``: a float, or a zero-argument
        callable measured only when needed (level >= 1 with ISP and
        ``colour_threshold`` set)."""
        c = self.config
        ref, src = None, None
        if c.reference == "server" and server_ref is not None and server_ref > 0:
            ref, src = float(server_ref), "server reference"
        elif self.ema is not None and self.ema > 0:
            ref, src = self.ema, "own loss EMA"
        if loss_global is not None:
            self.ema = loss_global if self.ema is None else c.ema_decay * self.ema + (1 - c.ema_decay) * loss_global
        if loss_global is None or ref is None:
            lvl = c.default_level
            why = "no global-model loss measured" if loss_global is None else "no reference loss yet"
            return Decision(lvl, c.modes[lvl], None, loss_global, ref, f"{why}: default level {lvl} ({c.modes[lvl].name})")
        s = relative_excess_loss(loss_global, ref)
        raw = level_for(s, c.thresholds)
        lvl, held = raw, ""
        if self.last_level is not None and raw < self.last_level and c.hysteresis > 0:
            lvl = max(raw, min(self.last_level, level_for(s + c.hysteresis, c.thresholds)))
            if lvl > raw:
                held = f" (held at previous level {lvl} by hysteresis {c.hysteresis})"
        self.last_level = lvl
        mode, cs, kind = c.modes[lvl], None, ""
        if c.colour_threshold is not None and mode.isp:
            cs = float(colour_signal() if callable(colour_signal) else colour_signal) \
                if colour_signal is not None else None
            mode = choose_mode(mode, cs, c.colour_threshold)
            if cs is not None:
                kind = (f"; colour signal {cs:+.3f} {'>' if cs > c.colour_threshold else '<='} "
                        f"{c.colour_threshold} -> {mode.name}")
        reason = (f"loss {loss_global:.4f} vs {src} {ref:.4f}: signal {s:+.3f}, thresholds {list(c.thresholds)} "
                  f"-> level {lvl} ({c.modes[lvl].name}){held}{kind}")
        return Decision(lvl, mode, s, loss_global, ref, reason, cs)
