"""`lifl sim`: simulate many FL clients against LIFL, in real processes or in virtual time.

    from lifl import sim
    cfg = sim.load("sim.toml", {"workload.clients_per_round": 1000})
    record = sim.run(cfg)
    sim.write_report(record, "sim-out")

Loaded lazily, so that ``lifl``'s other commands do not pay for it (docs/sim.md).
"""
from __future__ import annotations

__all__ = ["load", "run", "write_report", "SimConfig", "RunRecord", "SimConfigError"]

_WHERE = {"load": ("config", "load"), "SimConfig": ("config", "SimConfig"),
          "SimConfigError": ("config", "SimConfigError"), "run": ("runner", "run"),
          "write_report": ("report", "write"), "RunRecord": ("records", "RunRecord")}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'lifl.sim' has no attribute {name!r}")
    import importlib
    module, attr = _WHERE[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
