"""Framework-agnostic local trainer: one client's round of HeteroSwitch.

It knows nothing about Flower or LIFL: it takes a torch model (already loaded
with the received global weights), the client's images and labels, and a
:class:`~heteroswitch.bias.Decision` (or computes one), trains, and returns
numpy arrays, the number of examples and flat numeric metrics.  Transport
(Flower messages, LIFL pushes) is the caller's business
(:mod:`heteroswitch.flower`, :mod:`heteroswitch.bench`).

Compute accounting, reported in every result so that the cost of the remedies
is measured rather than assumed: ``train_samples`` (forward+backward),
``eval_samples`` (forward only: the bias probe and SWAD's valley losses),
``isp_images`` (images transformed), ``compute_units = 3 * train_samples +
eval_samples`` (forward-pass equivalents: a backward pass costs about two
forwards), and ``train_seconds`` wall time (device-synchronised).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .bias import BiasSwitch, Decision, Mode
from .isp import RandomISP, RandomISPConfig
from .metrics import accuracy, average_precision, softmax
from .cost import CostModel, PhaseTimer, round_flops
from .swad import SWAD, SWADConfig, recompute_bn

__all__ = [
    "TrainConfig",
    "TrainResult",
    "resolve_device",
    "as_float_images",
    "measure_loss",
    "predict",
    "train_local",
    "evaluate_devices",
    "state_to_numpy",
    "load_numpy_state",
]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 20
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_eval_samples: int = 64
    isp: RandomISPConfig = field(default_factory=RandomISPConfig)
    swad: SWADConfig = field(default_factory=SWADConfig)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("local_steps and batch_size must be >= 1")


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


def as_float_images(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` (numpy or torch) -> float32 in [0, 1]; floats pass through.

    Raises ``ValueError`` for other layouts, e.g. channels-last ``(N, H, W, 3)``.
    """
    t = torch.as_tensor(images)
    if t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(
            f"images must be (N, 3, H, W), got shape {tuple(t.shape)}"
            + (" (channels-last? use .transpose(0, 3, 1, 2))" if t.dim() == 4 and t.shape[-1] == 3 else "")
        )
    if t.dtype == torch.uint8:
        return t.to(device).float().div_(255.0)
    if t.is_floating_point():
        return t.to(device=device, dtype=torch.float32)
    raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {t.dtype}")


def _check_data(images, labels) -> None:
    n = len(labels)
    if n == 0:
        raise ValueError("client has no training examples (empty client); skip it instead of training")
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} labels")


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    sd = model.state_dict()
    missing = set(sd) - set(arrays)
    if missing:
        raise KeyError(f"received model lacks tensors: {sorted(missing)[:5]}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(arrays[k])).to(sd[k].dtype) for k in sd})


@torch.no_grad()
def predict(model: torch.nn.Module, images, device, batch_size: int = 512) -> np.ndarray:
    """Logits for all images, evaluated in eval mode."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = as_float_images(images[i:i + batch_size], device)
        out.append(model(x).float().cpu())
    model.train(was)
    return torch.cat(out).numpy()


def _is_multilabel(labels) -> bool:
    return np.asarray(labels).ndim == 2


def _targets(labels, device) -> torch.Tensor:
    """Class indices ``(N,)`` -> long; multi-hot ``(N, L)`` (FLAIR) -> float for BCE."""
    a = np.asarray(labels)
    if a.ndim == 2:
        return torch.as_tensor(a.astype(np.float32), device=device)
    if a.ndim != 1:
        raise ValueError(f"labels must be (N,) class indices or (N, L) multi-hot, got shape {a.shape}")
    return torch.as_tensor(a, dtype=torch.long, device=device)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices, binary cross-entropy for multi-hot targets."""
    if y.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y)


@torch.no_grad()
def measure_loss(model: torch.nn.Module, images, labels, device, max_samples: int | None = None) -> tuple[float, int]:
    """Mean loss of ``model`` on (up to ``max_samples`` of) the data; returns (loss, n_used)."""
    _check_data(images, labels)
    n = len(labels) if max_samples is None else min(len(labels), max_samples)
    logits = torch.as_tensor(predict(model, images[:n], device))
    return float(_loss(logits, _targets(labels[:n], "cpu"))), n


@torch.no_grad()
def _eval_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    v = float(_loss(model(x).float(), y))
    model.train(was)
    return v


_COSTS = CostModel()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_local(
    model: torch.nn.Module,
    images,
    labels,
    config: TrainConfig,
    mode: Mode | None = None,
    switch: BiasSwitch | None = None,
    server_ref: float | None = None,
    seed: int = 0,
) -> TrainResult:
    """Train ``model`` in place for ``config.local_steps`` steps and return its arrays.

    Either pass a fixed ``mode`` (baselines: FedAvg, always-ISP, always-SWAD)
    or a ``switch``: then the received model's loss on local data is measured
    first and the switch decides the mode (HeteroSwitch); with the switch's
    ``colour_threshold`` set, a flagged client also measures the colour signal
    (the received model's loss on ISP-transformed probe samples) and may get
    SWAD instead of ISP.  ``labels``: class indices ``(N,)`` (cross-entropy)
    or multi-hot ``(N, L)`` (binary cross-entropy, FLAIR).

    The metrics carry the client's cost: counts per phase, FLOPs per phase
    (``flops_<phase>``, ``flops_total``) and device-seconds per phase
    (``dev_s_<phase>``, ``dev_s_total``); see :mod:`heteroswitch.cost`.
    """
    _check_data(images, labels)
    dev = resolve_device(config.device)
    model.to(dev)
    t0 = time.perf_counter()
    timer = PhaseTimer(dev)
    n = len(labels)
    x_all = as_float_images(images, dev)
    y_all = _targets(labels, dev)
    metrics: dict[str, float] = {}
    counts = {"train_steps": 0.0, "probe_samples": 0.0, "probe_isp_images": 0.0, "isp_images": 0.0,
              "swad_eval_samples": 0.0, "swad_accumulates": 0.0}
    isp_gen = torch.Generator(device=dev).manual_seed(seed + 1) if dev.type == "cuda" else \
        torch.Generator(device="cpu").manual_seed(seed + 1)
    probe_isp = RandomISP(config.isp)

    if switch is not None:
        m_probe = min(n, config.bias_eval_samples)
        x_probe, y_probe = x_all[:m_probe], y_all[:m_probe]
        with timer.phase("probe"):
            loss0 = _eval_loss(model, x_probe, y_probe)
        counts["probe_samples"] += m_probe

        def colour_signal() -> float:
            # a separate generator: the colour probe must not shift the training ISP's random stream
            g = torch.Generator(device=isp_gen.device).manual_seed(seed + 2)
            with timer.phase("probe"):
                v = _eval_loss(model, probe_isp(x_probe, g), y_probe)
            counts["probe_samples"] += m_probe
            counts["probe_isp_images"] += m_probe
            return v / max(loss0, 1e-12) - 1.0

        decision = switch.decide(loss0, server_ref, colour_signal)
        metrics.update(decision.as_metrics())
        mode = decision.mode
    elif mode is None:
        mode = Mode()
    metrics.update({"mode_isp": float(mode.isp), "mode_swad": float(mode.swad)})

    gen = torch.Generator(device="cpu").manual_seed(seed)
    isp = RandomISP(config.isp) if mode.isp else None
    swad = SWAD(config.swad) if mode.swad else None
    if swad is not None:
        m_eval = min(n, config.swad.eval_samples)
        x_eval, y_eval = x_all[:m_eval], y_all[:m_eval]

    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    model.train()
    perm = torch.randperm(n, generator=gen)
    pos, losses = 0, []
    for step in range(config.local_steps):
        if pos + config.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + config.batch_size].to(dev)
        pos += config.batch_size
        xb, yb = x_all[idx], y_all[idx]
        if isp is not None:
            with timer.phase("isp"):
                xb = isp(xb, isp_gen)
            counts["isp_images"] += xb.shape[0]
        with timer.phase("sgd"):
            loss = _loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        counts["train_steps"] += 1
        if swad is not None:
            with timer.phase("swad_avg"):
                swad.on_step(model)
            counts["swad_accumulates"] += 1
            if (step + 1) % config.swad.eval_every == 0 or step + 1 == config.local_steps:
                with timer.phase("swad_eval"):
                    vl = _eval_loss(model, x_eval, y_eval)
                counts["swad_eval_samples"] += m_eval
                with timer.phase("swad_avg"):
                    swad.on_checkpoint(vl)
    if swad is not None:
        with timer.phase("swad_avg"):
            rep = swad.finalize(model)
        # merges of included segments + the final mean: about one accumulate each
        counts["swad_accumulates"] += rep["swad_segments_averaged"] + 1
        metrics.update(rep)
        if config.swad.bn_policy == "recompute":
            recompute_bn(model, [x_all[i:i + config.batch_size] for i in range(0, n, config.batch_size)])
    secs = timer.seconds()
    _sync(dev)
    wall = time.perf_counter() - t0
    train_samples = config.local_steps * min(config.batch_size, n)
    eval_samples = counts["probe_samples"] + counts["swad_eval_samples"]
    units = _COSTS.units(model, (min(config.batch_size, n), *x_all.shape[1:]), config.lr, config.momentum,
                         config.weight_decay, probe_isp, multilabel=y_all.dim() == 2)
    flops = round_flops(units, counts)
    metrics.update({
        "train_loss": float(torch.stack(losses).mean()),
        "train_samples": float(train_samples),
        "eval_samples": float(eval_samples),
        "isp_images": counts["isp_images"] + counts["probe_isp_images"],
        "compute_units": float(3 * train_samples + eval_samples),
        "train_seconds": wall,
        **{f"count_{k}": v for k, v in counts.items()},
        **{f"flops_{k}": v for k, v in flops.items()},
        **{f"dev_s_{k}": v for k, v in secs.items()},
    })
    return TrainResult(state_to_numpy(model), n, metrics)


def evaluate_devices(model: torch.nn.Module, test: dict, device="auto", num_thresholds: int = 200) -> dict[str, dict[str, float]]:
    """Per-device ``ap_macro``, ``ap_micro``, ``accuracy`` and ``loss`` on ``{device: (images, labels)}``.

    Multi-hot labels ``(N, L)`` (FLAIR): sigmoid scores, FLAIR's AP over the labels, binary
    cross-entropy; ``accuracy`` is NaN (not defined for multi-label).
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev)
    out = {}
    for name, (x, y) in test.items():
        logits = predict(model, x, dev)
        yl = np.asarray(y)
        if yl.ndim == 2:
            p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
            q = np.clip(np.where(yl.astype(bool), p, 1.0 - p), 1e-12, None)
            acc, loss = float("nan"), float(-np.mean(np.log(q)))
        else:
            p = softmax(logits)
            acc = accuracy(logits, yl)
            loss = float(-np.mean(np.log(np.clip(p[np.arange(len(yl)), yl], 1e-12, None))))
        out[name] = {
            "ap_macro": average_precision(p, yl, "macro", num_thresholds),
            "ap_micro": average_precision(p, yl, "micro", num_thresholds),
            "accuracy": acc,
            "loss": loss,
        }
    return out
