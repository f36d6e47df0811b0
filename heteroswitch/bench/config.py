"""What one benchmark experiment is: its typed config, the methods, the clients' lr schedule,
and the config's JSON form (worker processes read it; no pickle)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

import numpy as np

from ..bias import Mode, SwitchConfig
from ..flair_bench import FlairConfig
from ..scenes import FederatedConfig
from ..trainer import TrainConfig

METHODS: dict[str, Mode | None] = {
    "fedavg": Mode(False, False),
    "isp": Mode(True, False),
    "swad": Mode(False, True),
    "isp_swad": Mode(True, True),
    "heteroswitch": None,
}
PRIMARY = "ap_macro"


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 50
    clients_per_round: int = 10
    eval_every: int = 5
    model_width: int = 16
    model_blocks: tuple[int, ...] = (1, 1, 1)
    data: FederatedConfig = field(default_factory=FederatedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    switch: SwitchConfig = field(default_factory=SwitchConfig)
    aggregator: str = "auto"       # "lifl" | "local" | "auto" (lifl when lifl_address is set)
    lr_schedule: str = "cosine"    # "cosine" | "constant": the clients' lr per round, broadcast by the server
    lr_min_frac: float = 0.1       # cosine: the last round's lr = lr * lr_min_frac
    tail_rounds: int = 5           # evaluate every round among the last tail_rounds; the tail table averages them
    workers: int = 1
    device: str = "auto"
    out_dir: str = "heteroswitch_bench"
    flair: FlairConfig | None = None  # train on a FLAIR HDF5 file instead of the synthetic scenes
    lifl_address: str | None = None  # host:port of a running LIFL server (`lifl serve`) to aggregate through

    @property
    def aggregator_name(self) -> str:
        """The aggregator the jobs use: "lifl" or "local" ("auto" resolved)."""
        return "lifl" if self.aggregator == "lifl" or (self.aggregator == "auto" and self.lifl_address) else "local"

    @property
    def unseen_device(self) -> str:
        return self.flair.unseen_device if self.flair is not None else self.data.unseen_device

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {list(METHODS)}")
        if self.rounds < 1 or self.clients_per_round < 1 or not self.seeds:
            raise ValueError("need rounds >= 1, clients_per_round >= 1 and at least one seed")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.tail_rounds < 1:
            raise ValueError("tail_rounds must be >= 1")
        if self.aggregator not in ("lifl", "local", "auto"):
            raise ValueError(f"aggregator must be 'lifl', 'local' or 'auto', got {self.aggregator!r}")


def round_lr(cfg: BenchConfig, rnd: int) -> float:
    """The clients' learning rate in round ``rnd`` (1-based).

    Why a schedule (our choice, applied identically to every method): with a
    constant lr and non-IID clients the global model keeps jumping between
    rounds, so a single final-round snapshot mostly measures that jitter (the
    first GPU run had one seed dip from 0.98 to 0.85 AP in its last round).  A
    cosine decay from ``lr`` to ``lr * lr_min_frac`` lets every method settle.
    """
    base = cfg.train.lr
    if cfg.lr_schedule == "constant" or cfg.rounds == 1:
        return base
    t = (rnd - 1) / (cfg.rounds - 1)
    return base * (cfg.lr_min_frac + (1 - cfg.lr_min_frac) * 0.5 * (1 + np.cos(np.pi * t)))


# --------------------------------------------------------------------------- config <-> JSON
def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _hydrate(tp, value):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        return tp(**{k: _hydrate(hints[k], v) for k, v in value.items() if k in hints})
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_hydrate(args[0], v) for v in value)
        return tuple(_hydrate(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in typing.get_args(tp):
            if a is type(None) and value is None:
                return None
        for a in typing.get_args(tp):
            if a is not type(None):
                try:
                    return _hydrate(a, value)
                except Exception:  # noqa: BLE001 - try the next member of the union
                    continue  # nosec B112  # a member that does not fit is not an error
    return value


def config_from_dict(d: dict) -> BenchConfig:
    return _hydrate(BenchConfig, d)


