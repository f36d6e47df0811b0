"""Ask a server's grpc.health.v1 service, as the kubelet's gRPC probes and load balancers do."""
from __future__ import annotations

import queue
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def watch(address: str, service: str = "") -> "queue.Queue":
    """A queue of what Watch streams: each status, then the RPC's final code (or None on a clean end)."""
    seen: queue.Queue = queue.Queue()

    def run():
        with grpc.insecure_channel(address) as ch:
            try:
                for r in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=service)):
                    seen.put(r.status)
                seen.put(None)
            except grpc.RpcError as e:
                seen.put(e.code())

    threading.Thread(target=run, daemon=True).start()
    return seen
