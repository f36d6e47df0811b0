"""Names shared by the LIFL client mod and the LIFL strategy.

Keys the strategy writes into each ``train`` message's ConfigRecord (``lifl.*``),
keys the mod reads from the node config / run config (``lifl-*``), and the
error-code space of the Flower error replies the mod produces.
"""
from __future__ import annotations

from typing import Any, Mapping

import grpc

# -- written by the strategy into the train ConfigRecord --------------------------
ROUND = "lifl.round"            # int: the LIFL round id this train message belongs to
JOB = "lifl.job"                # str: LIFL job name
ADDRESS = "lifl.address"        # str: gateway host:port the client should push to
WEIGHT_KEY = "lifl.weight-key"  # str: metric used as the FedAvg weight (e.g. "num-examples")
ARRAYS_KEY = "lifl.arrays-key"  # str: name of the ArrayRecord in messages (e.g. "arrays")
PULL = "lifl.pull"              # bool: the model is not in the message; pull it from LIFL
BASE_VERSION = "lifl.base-version"  # int: asynchronous job: the model version sent; the mod pushes the delta

# -- the reply's receipt (a ConfigRecord that replaces the ArrayRecord) -----------
RECEIPT = "lifl-receipt"        # ConfigRecord name; fields: round, client-id, bytes, accepted, version, staleness

# -- node config / run config keys read by the mod (node config wins) ------------
NODE_ADDRESS = "lifl-address"      # override the address the strategy announced
NODE_TOKEN = "lifl-token"          # nosec B105  # the config key's name, not a token
NODE_ROOT_CERT = "lifl-root-cert"  # path to a PEM root certificate -> TLS
NODE_CA = "lifl-ca"                # the same as lifl-root-cert (the name docs/security.md uses)
NODE_CERT = "lifl-cert"            # path to this node's PEM client certificate (mutual TLS)
NODE_KEY = "lifl-key"              # path to its PEM private key (goes with lifl-cert)
NODE_CLIENT_ID = "lifl-client-id"  # the client id pushes carry (default: lifl-cert's common name, else node-<id>)
NODE_CHUNK_MIB = "lifl-chunk-mib"  # push chunk size in MiB (default 2)
NODE_TIMEOUT_S = "lifl-timeout-s"  # per-call timeout (default: none; push retries on RESOURCE_EXHAUSTED)
NODE_ENABLED = "lifl-enabled"      # false: the mod passes every message through (default true)
NODE_ENCODING = "lifl-encoding"    # update encoding: raw (default), float16, bfloat16, int8 (docs/encodings.md)

# Flower error replies produced by the mod carry ERROR_CODE_BASE + the numeric
# gRPC status (UNAVAILABLE -> 1014, INVALID_ARGUMENT -> 1003, ...). The reason
# text starts with "LIFL <STATUS_NAME>:" followed by the gateway's own message.
ERROR_CODE_BASE = 1000


def error_code(code: grpc.StatusCode) -> int:
    return ERROR_CODE_BASE + int(code.value[0])


def status_of(error_code_value: int) -> grpc.StatusCode | None:
    """Inverse of :func:`error_code` (None when the code is not a LIFL one)."""
    n = error_code_value - ERROR_CODE_BASE
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c
    return None


def setting(name: str, *sources: Mapping[str, Any] | None, default: Any = None) -> Any:
    """First value of ``name`` in ``sources`` (skipping None and empty strings)."""
    for src in sources:
        if src is not None and name in src and src[name] not in ("", None):
            return src[name]
    return default


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def flag(value: Any, name: str) -> bool:
    """A boolean setting from TOML (``true``/``false``) or a string/0/1 (``--node-config``, env);
    anything else raises ``ValueError`` naming the setting."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")
