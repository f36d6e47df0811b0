"""Fuzzing a real server: no malformed request may get INTERNAL or UNKNOWN, and the server survives.

Bounded for CI (a few seconds per method); ``python -m benchmarks.fuzz_server`` is the long run."""
import uuid

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fuzzing import METHODS, NEVER, call, requests_for
from support import small_model
from lifl.client import Client
from lifl.config import ServerConfig
from lifl.errors import LiflError
from lifl.server import EmbeddedServer
from lifl.shm import list_segments
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import chunk_payload

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def target():
    prefix = f"lifltest{uuid.uuid4().hex[:8]}"
    cfg = ServerConfig(port=0, metrics_port=-1, workers=1, leaves=1, planner="static", shm_prefix=prefix,
                       shm_budget_mb=16, max_model_mb=1, admission_timeout_s=0.2)
    with EmbeddedServer(cfg) as srv:
        with Client(srv.address) as c:      # real rounds for the fuzzer's small round ids to hit
            c.open_round(small_model(), expected=3)
            done = c.open_round(small_model(), expected=1)
            c.push(done, small_model(), 1, "a")
        with grpc.insecure_channel(srv.address) as ch:
            yield srv, ch
    assert list_segments(prefix) == [], "shared memory leaked"


@pytest.mark.parametrize("path", sorted(METHODS))
def test_no_malformed_request_gets_internal_or_unknown(target, path):
    srv, ch = target

    @FUZZ
    @given(requests_for(path))
    def one(request):
        code, msg = call(ch, path, request, timeout=2.0)
        assert code not in NEVER, (path, request[:2] if isinstance(request, list) else request, code, msg)
        assert len(msg) <= 1100

    one()
    with Client(srv.address) as c:          # still serving
        assert c.status().version


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=40))
def test_chunk_parser_returns_a_view_or_refuses_clearly(raw):
    try:
        view = chunk_payload(raw, pb.PushRequest, "update")
    except LiflError as e:
        assert e.code == "INVALID_ARGUMENT"
        return
    assert isinstance(view, memoryview) and len(view) <= len(raw)
    msg = pb.PushRequest.FromString(raw)    # what the fast path took is what protobuf sees
    assert msg.WhichOneof("kind") == "chunk" and bytes(view) == msg.chunk
