"""How the server listens: TLS, mutual TLS or (explicitly) plaintext, and gRPC's connection rules
(keep-alive enforcement, idle and age limits).

The plaintext rule: a server bound to a loopback address may serve plaintext (nothing off this
machine can reach it: the demo, tests); any other address needs ``tls_cert``/``tls_key`` or an
explicit ``insecure`` (``lifl serve --insecure``), and then logs a warning."""
from __future__ import annotations

import ipaddress
import logging

import grpc

log = logging.getLogger("lifl.transport")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_refusal(host: str, tls: bool, insecure: bool) -> str | None:
    """Why the server may not listen this way, or None. Pure."""
    if tls or insecure or is_loopback(host):
        return None
    return (f"refusing to serve plaintext on {host}, which is not a loopback address: set tls_cert and "
            "tls_key (see docs/security.md), or pass --insecure (setting insecure) to accept that anyone on "
            "the network can read and forge updates")


def server_credentials(config) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's files (mutual TLS with ``tls_client_ca``), or None for
    plaintext, after the plaintext rule; plaintext is logged (a warning unless loopback-only)."""
    why = plaintext_refusal(config.host, bool(config.tls_cert), config.insecure)
    if why:
        raise ValueError(why)
    if not config.tls_cert:
        if config.insecure or not is_loopback(config.host):
            log.warning("serving PLAINTEXT on %s (insecure): credentials and updates cross the network "
                        "unencrypted", config.host)
        else:
            log.info("serving plaintext on loopback %s; set tls_cert/tls_key to serve TLS", config.host)
        return None
    with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
        pair = (k.read(), c.read())
    if not config.tls_client_ca:
        return grpc.ssl_server_credentials([pair])
    with open(config.tls_client_ca, "rb") as f:
        ca = f.read()
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)


def listen(server: grpc.Server, target: str, creds: grpc.ServerCredentials | None) -> int:
    """Add ``target`` to ``server`` with these credentials (None: plaintext); the port, 0 on failure.
    The head's gateway and every node gateway of the Ray runtime listen through here, so a node
    gateway serves exactly the TLS / mutual TLS the server is configured with."""
    return server.add_secure_port(target, creds) if creds is not None else server.add_insecure_port(target)


def head_link_credentials(config) -> grpc.ChannelCredentials | None:
    """How a Ray node gateway reaches the head (``head_link``), whose port serves the server's own
    TLS: None for plaintext; else it trusts ``tls_client_ca`` (the project CA, which must then also
    have signed the server certificate) or, without one, the server certificate itself (self-signed),
    and under mutual TLS presents the server's certificate and key as its client certificate."""
    if not config.tls_cert:
        return None
    with open(config.tls_cert, "rb") as c, open(config.tls_key, "rb") as k:
        cert, key = c.read(), k.read()
    if not config.tls_client_ca:
        return grpc.ssl_channel_credentials(cert)
    with open(config.tls_client_ca, "rb") as f:
        return grpc.ssl_channel_credentials(f.read(), key, cert)


def connection_options(config) -> list[tuple[str, int]]:
    """gRPC channel arguments that enforce the keep-alive and connection-lifetime settings."""
    ms = lambda s: int(s * 1000)  # noqa: E731
    opts = [("grpc.keepalive_time_ms", ms(config.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(config.keepalive_min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", config.keepalive_max_ping_strikes)]
    if config.max_connection_idle_s > 0:
        opts.append(("grpc.max_connection_idle_ms", ms(config.max_connection_idle_s)))
    if config.max_connection_age_s > 0:
        opts += [("grpc.max_connection_age_ms", ms(config.max_connection_age_s)),
                 ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_s))]
    return opts
