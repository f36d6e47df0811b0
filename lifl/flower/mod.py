"""The LIFL client mod for Flower's ``ClientApp`` (Message API, flwr >= 1.42).

    from lifl.flower import lifl_mod
    app = ClientApp(mods=[lifl_mod])

What it does, for ``train`` messages that a :class:`lifl.flower.LiflStrategy`
configured (their ConfigRecord carries ``lifl.round``); every other message
passes through untouched, so the mod can stay installed when the server runs a
stock strategy:

1. *pull option* (``lifl.pull`` set): the message arrives without the model;
   the mod pulls the model the LIFL round was opened with from the gateway and
   puts it into the message as the ArrayRecord the handler expects.
2. the handler runs (``call_next``).
3. the reply's ArrayRecord is streamed to the LIFL gateway (round, job, weight
   = the reply's weighting metric, client id ``node-<node_id>``) and replaced
   by a small ConfigRecord receipt (``lifl-receipt``); the MetricRecords stay
   as they are, so the strategy can aggregate metrics as before.

Failures (gateway unreachable, a rejection such as a wrong tensor layout,
a reply without the weighting metric) become a Flower *error reply* whose code
is ``1000 + gRPC status`` and whose reason is ``"LIFL <STATUS>: <message>"`` —
never a silent drop.

Settings, first match wins: node config (``lifl-address``, ``lifl-token``,
``lifl-root-cert``, ``lifl-chunk-mib``, ``lifl-timeout-s``), then what the
strategy put in the message (``lifl.address``), then the run config (same
``lifl-*`` keys).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
import grpc
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from ..client import MiB, Client, RpcFailure
from . import config as K

log = logging.getLogger("flwr.lifl")  # propagates to Flower's log handlers

_clients: dict[tuple, Client] = {}
_clients_lock = threading.Lock()


def _client(address: str, token: str | None, root_cert_path: str | None, chunk_mib: float,
            timeout_s: float | None) -> Client:
    """One gRPC channel per (address, credentials) per ClientApp process, reused across rounds."""
    key = (address, token, root_cert_path, chunk_mib, timeout_s)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            cert = None
            if root_cert_path:
                with open(root_cert_path, "rb") as f:
                    cert = f.read()
            c = Client(address, token=token, root_cert=cert, chunk_size=int(chunk_mib * MiB), timeout_s=timeout_s)
            _clients[key] = c
        return c


def _drop_client(c: Client) -> None:
    with _clients_lock:
        for k, v in list(_clients.items()):
            if v is c:
                del _clients[k]
    c.close()


class _ModFailure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _train_config(msg: Message) -> ConfigRecord | None:
    """The ConfigRecord carrying ``lifl.round``, or None when LIFL is not in use for this message."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or not msg.has_content():
        return None
    for rec in msg.content.config_records.values():
        if K.ROUND in rec:
            return rec
    return None


def arrays_to_numpy(record: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    """ArrayRecord -> name -> ndarray, keeping the record's key order."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def numpy_to_arrays(arrays) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in arrays.items()))


def _error_reply(msg: Message, code: grpc.StatusCode, text: str) -> Message:
    reason = f"LIFL {code.name}: {text}"
    log.warning("LIFL mod: replying with an error: %s", reason)
    return Message(Error(code=K.error_code(code), reason=reason), reply_to=msg)


def lifl_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: stream train replies to LIFL (see the module docstring)."""
    cfg = _train_config(msg)
    if cfg is None:
        return call_next(msg, context)

    node, run = context.node_config, context.run_config
    address = K.setting(K.NODE_ADDRESS, node, {K.NODE_ADDRESS: cfg.get(K.ADDRESS)}, run)
    token = K.setting(K.NODE_TOKEN, node, run)
    cert = K.setting(K.NODE_ROOT_CERT, node, run)
    chunk_mib = float(K.setting(K.NODE_CHUNK_MIB, node, run, default=2))
    timeout = K.setting(K.NODE_TIMEOUT_S, node, run)
    timeout = float(timeout) if timeout is not None else None
    rid, job = int(cfg[K.ROUND]), str(cfg.get(K.JOB, "default"))
    weight_key = str(cfg.get(K.WEIGHT_KEY, "num-examples"))
    arrays_key = str(cfg.get(K.ARRAYS_KEY, "arrays"))
    client_id = f"node-{context.node_id}"
    if not address:
        return _error_reply(msg, grpc.StatusCode.FAILED_PRECONDITION,
                            "no gateway address: set node config 'lifl-address' or let the strategy announce one")
    try:
        client = _client(str(address), token and str(token), cert and str(cert), chunk_mib, timeout)
    except OSError as e:
        return _error_reply(msg, grpc.StatusCode.FAILED_PRECONDITION, f"cannot read lifl-root-cert: {e}")

    # 1. pull option: fetch the global model from LIFL instead of the SuperLink
    if bool(cfg.get(K.PULL, False)):
        try:
            model = client.pull(rid, initial=True, job=job)
        except RpcFailure as e:
            return _error_reply(msg, e.code, f"pulling the model of round {rid} from {address} failed: {e.message}")
        msg.content[arrays_key] = numpy_to_arrays(model)
        del model

    # 2. the user's handler
    reply = call_next(msg, context)
    if reply.has_error():
        return reply

    # 3. push the update, swap it for a receipt
    try:
        content = reply.content
        records = content.array_records
        if arrays_key in records:
            name = arrays_key
        elif len(records) == 1:
            name = next(iter(records))
        else:
            raise _ModFailure(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the reply carries {len(records)} ArrayRecords and none is named {arrays_key!r}")
        weight = None
        for mrec in content.metric_records.values():
            if weight_key in mrec:
                weight = mrec[weight_key]
                break
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise _ModFailure(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the reply has no numeric weighting metric {weight_key!r} in its MetricRecord")
        update = arrays_to_numpy(records[name])
        receipt = client.push(rid, update, num_examples=float(weight), client_id=client_id, job=job)
        del update
    except RpcFailure as e:
        if e.code == grpc.StatusCode.UNAVAILABLE:
            _drop_client(client)
        return _error_reply(msg, e.code, f"push of round {rid} to {address} as {client_id!r} failed: {e.message}")
    except _ModFailure as e:
        return _error_reply(msg, e.code, e.message)
    except (ValueError, TypeError) as e:   # arrays the LIFL layout cannot describe
        return _error_reply(msg, grpc.StatusCode.INVALID_ARGUMENT, f"cannot send the update: {e}")

    # drop every ArrayRecord (the update now lives in LIFL), add the receipt
    for k in list(records):
        del content[k]
    content[K.RECEIPT] = ConfigRecord({"round": receipt.round, "client-id": receipt.client_id,
                                       "bytes": receipt.bytes_received, "accepted": receipt.accepted})
    return reply


__all__ = ["lifl_mod", "arrays_to_numpy", "numpy_to_arrays"]

