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
``lifl-root-cert`` or ``lifl-ca``, ``lifl-cert`` + ``lifl-key`` for mutual TLS, ``lifl-client-id``
(default: the common name of ``lifl-cert``, which a mutual-TLS server requires as the client id;
without a certificate ``node-<node id>``), ``lifl-chunk-mib``, ``lifl-timeout-s``, ``lifl-encoding``: ``raw``,
``float16``, ``bfloat16`` or ``int8``, see docs/encodings.md), then what the
strategy put in the message (``lifl.address``), then the run config (same
``lifl-*`` keys).

Switch: ``lifl-enabled = false`` (run config for the whole federation, or one
node's config; node config wins) makes the mod pass every message through, so
the same app runs with and without LIFL; a :class:`LiflStrategy` then pushes
the replies' arrays on the clients' behalf. Only its pull option needs the mod
(the model is not in the message): a disabled mod answers that with an error reply.
"""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
import grpc
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from ..client import MiB, Client, RpcFailure
from ..encoding import parse as parse_encoding
from ..layout import Layout
from . import config as K

log = logging.getLogger("flwr.lifl")  # propagates to Flower's log handlers

_clients: dict[tuple, Client] = {}
_clients_lock = threading.Lock()


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _client(address: str, token: str | None, root_cert_path: str | None, chunk_mib: float,
            timeout_s: float | None, cert_path: str | None = None, key_path: str | None = None) -> Client:
    """One gRPC channel per (address, credentials) per ClientApp process, reused across rounds.
    ``cert_path``/``key_path``: this node's client certificate and key (mutual TLS)."""
    key = (address, token, root_cert_path, chunk_mib, timeout_s, cert_path, key_path)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = Client(address, token=token, root_cert=_read(root_cert_path), chunk_size=int(chunk_mib * MiB),
                       timeout_s=timeout_s, client_cert=_read(cert_path), client_key=_read(key_path))
            _clients[key] = c
        return c


def certificate_identity(cert_path: str) -> str:
    """The common name of a PEM certificate: the identity a mutual-TLS LIFL server gives its holder."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    names = x509.load_pem_x509_certificate(_read(cert_path)).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError(f"{cert_path} has no common name; set lifl-client-id")
    return str(names[0].value)


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


def _npy_view(a: Array) -> np.ndarray:
    """A read-only ndarray over an Array's own bytes (no copy), or ``Array.numpy()`` when that is not possible.

    Flower keeps a numpy Array as the ``np.save`` bytes (``.npy`` header + raw data);
    ``Array.numpy()`` parses them with ``np.load``, which copies the whole tensor. For
    sending an update or a model to LIFL a view is enough, so a model never exists
    twice in the process just to be streamed out.
    """
    data = a.data
    if a.stype == "numpy.ndarray" and isinstance(data, (bytes, bytearray, memoryview)):
        try:
            f = io.BytesIO(memoryview(data)[:4096])          # the header is at most a few hundred bytes
            major, _minor = np.lib.format.read_magic(f)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif major == 2:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format {major}")
            if not fortran and not dtype.hasobject:
                count = int(np.prod(shape, dtype=np.int64))
                if f.tell() + count * dtype.itemsize == len(data):
                    return np.frombuffer(data, dtype=dtype, count=count, offset=f.tell()).reshape(shape)
        except (ValueError, EOFError):
            pass
    return a.numpy()


def arrays_to_numpy(record: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    """ArrayRecord -> name -> ndarray (read-only views over the record's bytes where possible), key order kept."""
    return OrderedDict((k, _npy_view(v)) for k, v in record.items())


def _npy_array(v) -> Array:
    """``Array(v)`` with the same ``.npy`` bytes, built with one copy of the tensor.

    ``Array(ndarray)`` goes through ``np.save`` into a growing BytesIO and then copies it
    out; here the header and the tensor are joined straight into the final bytes object.
    """
    v = np.asarray(v)
    if v.dtype.hasobject or not (v.flags.c_contiguous or v.ndim == 0):
        return Array(v)
    head = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(v))
    except ValueError:                 # header too large for format 1.0: let np.save pick
        return Array(v)
    data = b"".join((head.getvalue(), v.reshape(-1).view(np.uint8)))
    return Array(dtype=str(v.dtype), shape=tuple(int(d) for d in v.shape), stype="numpy.ndarray", data=data)


def numpy_to_arrays(arrays) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, _npy_array(v)) for k, v in arrays.items()))


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of this dtype and shape."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
               "shape": tuple(int(d) for d in shape)})
    return head.getvalue()


def pull_arrays(client: Client, rid: int, *, wait_s: float = 0.0, initial: bool = False,
                job: str = "default") -> ArrayRecord:
    """Pull a LIFL model straight into a Flower ArrayRecord, one tensor at a time.

    Same result as ``numpy_to_arrays(client.pull(...))`` but without the whole-model
    receive buffer: each tensor's ``.npy`` bytes are filled from the stream and handed
    to Flower as soon as they are complete, so the process holds the model once
    (plus one tensor) instead of twice.
    """
    from ..v1 import aggregation_pb2 as pb
    req = pb.PullRequest(job=job, round=rid, wait_seconds=wait_s,
                         kind=pb.MODEL_KIND_INITIAL if initial else pb.MODEL_KIND_RESULT)
    return _pull_record(client, req)[1]


def pull_arrays_version(client: Client, version: int | str = "latest", *, job: str = "default"
                        ) -> tuple[int, ArrayRecord]:
    """An asynchronous job's version (``"latest"`` or a number) as (version, ArrayRecord), as :func:`pull_arrays`."""
    from ..v1 import aggregation_pb2 as pb
    req = (pb.PullRequest(job=job, latest=True) if version == "latest"
           else pb.PullRequest(job=job, version=int(version)))
    head, record = _pull_record(client, req)
    return head.version, record


def _pull_record(client: Client, req) -> tuple[object, ArrayRecord]:
    from ..layout import public_dtype
    from ..v1 import aggregation_pb2 as pb
    from ..wire import chunk_payload

    timeout = None if client.timeout_s is None else client.timeout_s + req.wait_seconds
    out: "OrderedDict[str, Array]" = OrderedDict()
    try:
        stream = client._pull(req, metadata=client._md, timeout=timeout)
        head = pb.PullChunk.FromString(next(stream)).header
        layout = Layout.from_proto(head.tensors)
        specs, offsets = layout.specs, layout.offsets
        i, pos = 0, 0                       # next tensor to complete; bytes of the flat layout seen
        cur, cur_off, hlen = None, 0, 0     # the tensor being filled: npy buffer, layout offset, header size

        def start(k: int):
            sp = specs[k]
            head = _npy_header(public_dtype(sp.dtype), sp.shape)
            buf = bytearray(len(head) + sp.nbytes)
            buf[:len(head)] = head
            return buf, offsets[k], len(head)

        def finish(k: int, buf: bytearray) -> None:
            sp = specs[k]
            out[sp.name] = Array(dtype=str(public_dtype(sp.dtype)), shape=tuple(sp.shape),
                                 stype="numpy.ndarray", data=bytes(buf))

        while i < len(specs) and specs[i].nbytes == 0:      # empty tensors carry no bytes
            finish(i, start(i)[0]); i += 1
        if i < len(specs):
            cur, cur_off, hlen = start(i)
        for raw in stream:
            piece = chunk_payload(raw, pb.PullChunk, "model chunk")
            p0, p1 = pos, pos + len(piece)
            while cur is not None:
                sp = specs[i]
                a, b = max(p0, cur_off), min(p1, cur_off + sp.nbytes)
                if a < b:
                    cur[hlen + a - cur_off:hlen + b - cur_off] = piece[a - p0:b - p0]
                if cur_off + sp.nbytes > p1:
                    break                                   # this tensor goes on in the next chunk
                finish(i, cur); cur = None; i += 1
                while i < len(specs) and specs[i].nbytes == 0:
                    finish(i, start(i)[0]); i += 1
                if i < len(specs):
                    cur, cur_off, hlen = start(i)
            pos = p1
    except grpc.RpcError as e:
        raise RpcFailure(e.code(), e.details() or str(e)) from None
    if cur is not None or pos != layout.total_size:
        raise RpcFailure(grpc.StatusCode.DATA_LOSS, f"model stream ended after {pos} of {layout.total_size} bytes")
    return head, ArrayRecord(out)


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A model's worth of tensor-sized buffers (gRPC chunks, ``.npy`` bytes) is allocated
    and freed every round; glibc keeps such freed blocks in its arenas, so without a
    trim a long-lived ServerApp or ClientApp grows by about a model per round.
    """
    global _trim
    if _trim is None:
        try:
            import ctypes
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None


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
    try:
        enabled = K.flag(K.setting(K.NODE_ENABLED, node, run, default=True), K.NODE_ENABLED)
    except ValueError as e:
        return _error_reply(msg, grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if not enabled:
        if bool(cfg.get(K.PULL, False)):
            return _error_reply(msg, grpc.StatusCode.FAILED_PRECONDITION,
                                f"{K.NODE_ENABLED} is false but the strategy sends the model through LIFL "
                                "(its pull option): enable the mod or turn the pull option off")
        return call_next(msg, context)
    address = K.setting(K.NODE_ADDRESS, node, {K.NODE_ADDRESS: cfg.get(K.ADDRESS)}, run)
    token = K.setting(K.NODE_TOKEN, node, run)
    cert = K.setting(K.NODE_ROOT_CERT, node, run) or K.setting(K.NODE_CA, node, run)
    client_cert, client_key = K.setting(K.NODE_CERT, node, run), K.setting(K.NODE_KEY, node, run)
    if bool(client_cert) != bool(client_key):
        return _error_reply(msg, grpc.StatusCode.FAILED_PRECONDITION,
                            f"{K.NODE_CERT} and {K.NODE_KEY} go together: set both (mutual TLS) or neither")
    chunk_mib = float(K.setting(K.NODE_CHUNK_MIB, node, run, default=2))
    timeout = K.setting(K.NODE_TIMEOUT_S, node, run)
    timeout = float(timeout) if timeout is not None else None
    try:
        encoding = parse_encoding(str(K.setting(K.NODE_ENCODING, node, run, default="raw")))
    except ValueError as e:
        return _error_reply(msg, grpc.StatusCode.INVALID_ARGUMENT, f"bad {K.NODE_ENCODING} setting: {e}")
    rid, job = int(cfg[K.ROUND]), str(cfg.get(K.JOB, "default"))
    weight_key = str(cfg.get(K.WEIGHT_KEY, "num-examples"))
    arrays_key = str(cfg.get(K.ARRAYS_KEY, "arrays"))
    client_id = K.setting(K.NODE_CLIENT_ID, node, run)
    if not address:
        return _error_reply(msg, grpc.StatusCode.FAILED_PRECONDITION,
                            "no gateway address: set node config 'lifl-address' or let the strategy announce one")
    try:
        if client_id is None:
            client_id = certificate_identity(str(client_cert)) if client_cert else f"node-{context.node_id}"
        client = _client(str(address), token and str(token), cert and str(cert), chunk_mib, timeout,
                         client_cert and str(client_cert), client_key and str(client_key))
    except (OSError, ValueError) as e:
        return _error_reply(msg, grpc.StatusCode.FAILED_PRECONDITION,
                            f"cannot read lifl-root-cert/lifl-ca/lifl-cert/lifl-key: {e}")
    client_id = str(client_id)

    # 1. pull option: fetch the global model from LIFL instead of the SuperLink
    if bool(cfg.get(K.PULL, False)):
        try:
            msg.content[arrays_key] = pull_arrays(client, rid, initial=True, job=job)
        except RpcFailure as e:
            return _error_reply(msg, e.code, f"pulling the model of round {rid} from {address} failed: {e.message}")
        release_heap()

    # asynchronous job: remember the model received, to push the delta against it
    base = cfg.get(K.BASE_VERSION)
    received = arrays_to_numpy(msg.content[arrays_key]) if base is not None and arrays_key in msg.content else None

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
        if base is not None:
            update = _delta(update, received)
        receipt = client.push(rid, update, num_examples=float(weight), client_id=client_id, job=job,
                              encoding=encoding, base_version=None if base is None else int(base))
        del update
        release_heap()
    except RpcFailure as e:
        if e.code == grpc.StatusCode.UNAVAILABLE:
            _drop_client(client)
        what = f"round {rid}" if base is None else f"a delta on version {base}"
        return _error_reply(msg, e.code, f"push of {what} to {address} as {client_id!r} failed: {e.message}")
    except _ModFailure as e:
        return _error_reply(msg, e.code, e.message)
    except (ValueError, TypeError) as e:   # arrays the LIFL layout cannot describe
        return _error_reply(msg, grpc.StatusCode.INVALID_ARGUMENT, f"cannot send the update: {e}")

    # drop every ArrayRecord (the update now lives in LIFL), add the receipt
    for k in list(records):
        del content[k]
    content[K.RECEIPT] = ConfigRecord({"round": receipt.round, "client-id": receipt.client_id,
                                       "bytes": receipt.bytes_received, "accepted": receipt.accepted,
                                       "version": receipt.version, "staleness": receipt.staleness})
    return reply


def _delta(update, received) -> "OrderedDict[str, np.ndarray]":
    """reply − model received, per tensor in the tensor's dtype (computed in float64)."""
    if received is None or list(update) != list(received):
        raise _ModFailure(grpc.StatusCode.INVALID_ARGUMENT, "an asynchronous train reply must carry the same "
                                                            "tensors as the model it was sent")
    return OrderedDict((k, (np.asarray(v, np.float64) - np.asarray(received[k], np.float64)).astype(v.dtype))
                       for k, v in update.items())


__all__ = ["lifl_mod", "arrays_to_numpy", "numpy_to_arrays", "pull_arrays", "pull_arrays_version", "release_heap"]

