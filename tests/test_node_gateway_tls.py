"""The path every listening gateway takes (the head's and, on the Ray runtime, each node's):
``transport.listen`` with ``transport.server_credentials(config)``. Unit level: a real gRPC server on
loopback with the mutual-TLS settings a node gateway receives. The Ray node gateways themselves
serve mutual TLS in tests/ray/test_ray_runtime.py::test_node_gateways_serve_the_servers_mutual_tls."""
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pki import CA
from lifl.config import ServerConfig
from lifl.transport import listen, server_credentials


def check(address, creds=None):
    ch = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as e:
            return e.code()


def test_a_gateway_listens_with_the_servers_mutual_tls(tmp_path):
    ca, other = CA(), CA("another CA")
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    cfg = ServerConfig(host="127.0.0.1", tls_cert=cert, tls_key=key, tls_client_ca=str(tmp_path / "ca.pem"))
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = listen(server, "127.0.0.1:0", server_credentials(cfg))
    server.start()
    try:
        addr = f"127.0.0.1:{port}"
        site, stranger = ca.issue("site-1"), other.issue("site-1")
        ok = grpc.ssl_channel_credentials(ca.pem, site.key, site.cert)
        assert check(addr, ok) == health_pb2.HealthCheckResponse.SERVING
        assert check(addr, grpc.ssl_channel_credentials(ca.pem)) == grpc.StatusCode.UNAVAILABLE      # no cert
        assert check(addr, grpc.ssl_channel_credentials(ca.pem, stranger.key, stranger.cert)) == \
            grpc.StatusCode.UNAVAILABLE                                                             # another CA
        assert check(addr) == grpc.StatusCode.UNAVAILABLE                                           # plaintext
    finally:
        server.stop(None)


def test_a_non_loopback_gateway_refuses_plaintext_without_insecure():
    with pytest.raises(ValueError, match="refusing to serve plaintext"):
        server_credentials(ServerConfig(host="0.0.0.0"))
    assert server_credentials(ServerConfig(host="0.0.0.0", insecure=True)) is None
