"""What a simulation run records: typed rows that go to JSON and come back for ``lifl sim report``."""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RoundRecord:
    round: int
    selected: int                  # clients picked (online at the round's start)
    reported: int                  # updates the platform accepted
    available: int                 # clients online when the round opened
    round_s: float                 # open -> result available
    post_arrival_s: float          # last accepted update -> result
    push_phase_s: float = 0.0      # open -> last upload done
    start_s: float = 0.0           # when the round opened, on the run's clock (virtual or wall)
    refused: dict = field(default_factory=dict)   # updates refused or lost, by reason
    max_rel_error: float | None = None            # vs float64 FedAvg (real mode)
    accuracy: float | None = None                 # training mode
    total_weight: float = 0.0
    cold_starts: int = 0
    warm_reuses: int = 0
    leaves: int = 0


@dataclass
class VariantRecord:
    mode: str                      # "real" | "virtual"
    variant: str
    server: dict = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    cpu: dict = field(default_factory=lambda: {"gateway": 0.0, "functions": 0.0, "clients": 0.0})
    peak_pss_bytes: int = 0        # server tree (real) or modelled platform memory (virtual)
    timeline: dict = field(default_factory=dict)   # t, alive{role: [...]}, arrivals
    counters: dict = field(default_factory=dict)
    wall_s: float = 0.0            # how long the simulation itself took
    update_bytes: int = 0
    bytes_between_processes: int = 0
    bytes_between_nodes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_total(self) -> float:
        return self.cpu.get("gateway", 0.0) + self.cpu.get("functions", 0.0)

    @classmethod
    def from_dict(cls, d: dict) -> "VariantRecord":
        d = dict(d)
        d["rounds"] = [RoundRecord(**r) for r in d.get("rounds", [])]
        return cls(**d)


@dataclass
class RunRecord:
    config: dict
    machine: dict = field(default_factory=lambda: machine())
    variants: list[VariantRecord] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)   # virtual vs real, per size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=_default)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read run record {path}: {e}") from None
        if not isinstance(d, dict) or "variants" not in d or "config" not in d:
            raise ValueError(f"{path} is not a lifl sim run record (no config/variants)")
        try:
            return cls(d["config"], d.get("machine", {}), [VariantRecord.from_dict(v) for v in d["variants"]],
                       d.get("calibration", {}), d.get("validation", []))
        except TypeError as e:
            raise ValueError(f"{path}: malformed run record: {e}") from None


def compact_timeline(t: list[float], alive: dict[str, list[int]], arrivals: list[float],
                     max_points: int = 2000) -> dict:
    """At most ``max_points`` samples of functions alive by role (the peak of each stretch), and
    arrivals as counts per bin on the same grid: a 100,000-client run stays a small JSON file."""
    import numpy as np
    n = len(t)
    alive = {"total": [sum(v[i] for v in alive.values()) for i in range(n)], **alive}
    step = max(1, -(-n // max_points))
    tt = [t[i] for i in range(0, n, step)]
    out_alive = {k: [max(v[i:i + step]) for i in range(0, n, step)] for k, v in alive.items()}
    end = max([tt[-1] if tt else 0.0] + ([max(arrivals)] if arrivals else [])) or 1.0
    bins = min(max_points, max(1, len(tt)))
    counts, edges = np.histogram(np.asarray(arrivals, float), bins=bins, range=(0.0, end))
    return {"t": tt, "alive": out_alive, "arrival_bins": edges[:-1].tolist(), "arrivals": counts.tolist(),
            "arrival_bin_s": float(edges[1] - edges[0])}


def _default(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def machine() -> dict:
    import numpy as np
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
