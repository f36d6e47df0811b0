"""grpc.health.v1 in the embedded server: what the kubelet's gRPC probes and load balancers ask."""
from __future__ import annotations

import grpc
import pytest

from lifl.server import HEALTH_SERVICES

from .probes import NOT_SERVING, SERVING, check, watch


def test_every_service_is_serving_and_unknown_ones_are_not_found(make_server):
    srv = make_server(tokens=["t0k3n-client"], admin_token="t0k3n-admin")
    assert set(HEALTH_SERVICES) == {"", "lifl.v1.Aggregation", "lifl.v1.Admin"}
    for service in HEALTH_SERVICES:  # no token: probes carry none
        assert check(srv.address, service) == SERVING
    with pytest.raises(grpc.RpcError) as e:
        check(srv.address, "lifl.v1.Nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_says_not_serving_before_the_server_goes(make_server):
    srv = make_server()
    seen = watch(srv.address, "lifl.v1.Aggregation")
    assert seen.get(timeout=10) == SERVING
    srv.stop()
    assert seen.get(timeout=10) == NOT_SERVING
    assert seen.get(timeout=10) == grpc.StatusCode.UNAVAILABLE  # then the server is gone
