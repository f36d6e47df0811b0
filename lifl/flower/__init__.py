"""Flower integration: a client mod that streams train replies to LIFL and a
strategy wrapper that takes LIFL's aggregate (Message API, flwr >= 1.42).

    from lifl.flower import lifl_mod, LiflStrategy
    ClientApp(mods=[lifl_mod])
    LiflStrategy(FedAvg(...), address="127.0.0.1:50051").start(grid=grid, ...)
    AsyncFedBuff(AsyncSpec(...), address="127.0.0.1:50051").start(grid, arrays, num_versions=20)  # no rounds

Needs the ``flower`` extra (``pip install lifl[flower]``). See docs/flower.md.
"""
from .config import ERROR_CODE_BASE, error_code, status_of
from .mod import arrays_to_numpy, lifl_mod, numpy_to_arrays, pull_arrays, pull_arrays_version, release_heap
from .fedbuff import AsyncFedBuff, AsyncResult
from .strategy import LiflStrategy

__all__ = ["lifl_mod", "LiflStrategy", "AsyncFedBuff", "AsyncResult", "ERROR_CODE_BASE", "error_code", "status_of",
           "arrays_to_numpy", "numpy_to_arrays", "pull_arrays", "pull_arrays_version", "release_heap"]
