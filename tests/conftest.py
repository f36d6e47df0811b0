"""Shared fixtures: real servers on loopback with a per-test shared-memory prefix and a leak check.

Helpers (reference FedAvg, models) live in support.py: a name other than conftest, so that
tests/heteroswitch/conftest.py cannot shadow them."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from lifl.config import ServerConfig
from lifl.server import EmbeddedServer
from lifl.shm import list_segments

# the test and benchmark harness (benchmarks/: server launchers, the Flower stack) is not shipped
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def shm_prefix():
    prefix = f"lifltest{uuid.uuid4().hex[:8]}"
    yield prefix
    assert list_segments(prefix) == [], "shared-memory segments leaked"


@pytest.fixture
def make_server(shm_prefix):
    servers = []

    def make(**kw) -> EmbeddedServer:
        kw.setdefault("port", 0)
        kw.setdefault("metrics_port", -1)
        kw.setdefault("workers", 2)
        kw.setdefault("leaves", 2)
        kw.setdefault("fan_in", 2)
        kw.setdefault("planner", "static")  # tests name their tree shapes; the elastic planner has its own tests
        clock = kw.pop("clock", None)
        srv = EmbeddedServer(ServerConfig(shm_prefix=shm_prefix, **kw), clock=clock).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def clocked(make_server):
    """A real server whose engine reads a manual clock: deadlines and keep-alives pass only when
    the test advances it and ticks (``srv.tick()``), never by racing the machine's clock."""
    from lifl.engine.clock import ManualClock

    def make(**kw):
        clock = ManualClock()
        return make_server(clock=clock, **kw), clock
    return make


os.environ.setdefault("PYTHONUNBUFFERED", "1")
