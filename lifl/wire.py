"""Protobuf wire helpers for the byte-heavy messages.

``PushRequest``, ``OpenRoundRequest`` and ``PullChunk`` carry a ``bytes chunk``
as field 2 of a oneof. A chunk message is encoded by hand as tag 0x12 +
varint length + payload, and decoded the same way as a zero-copy view of the
received message, which saves one full copy of every update compared with
building/parsing protobuf objects. Anything not in that exact shape goes
through the regular protobuf parser, so any conforming client works.
"""
from __future__ import annotations

from google.protobuf.message import DecodeError

from .errors import LiflError

_CHUNK_TAG = 0x12  # field 2, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_chunk(payload) -> bytes:
    """Serialized ``{chunk: payload}`` message (one copy of payload)."""
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(payload)), payload))


def chunk_view(raw: bytes) -> memoryview | None:
    """The payload of a serialized chunk message as a view, or None if it is not one."""
    if len(raw) < 2 or raw[0] != _CHUNK_TAG:
        return None
    n = shift = 0
    i = 1
    while i < len(raw) and i < 11:
        b = raw[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    else:
        return None
    if i + n != len(raw):
        return None
    return memoryview(raw)[i:]


def parse(raw: bytes, cls, what: str):
    """Parse a message or raise INVALID_ARGUMENT with a message a person can act on."""
    try:
        return cls.FromString(raw)
    except (DecodeError, RuntimeError) as e:
        raise LiflError("INVALID_ARGUMENT", f"{what} is not a valid {cls.DESCRIPTOR.full_name} message ({e})") from None


def chunk_payload(raw: bytes, cls, what: str) -> memoryview:
    """The chunk bytes of a stream message after the header (fast path, then protobuf)."""
    view = chunk_view(raw)
    if view is not None:
        return view
    msg = parse(raw, cls, what)
    if msg.WhichOneof("kind") != "chunk":
        raise LiflError("INVALID_ARGUMENT", f"{what}: expected a chunk of bytes after the header, got {msg.WhichOneof('kind')}")
    return memoryview(msg.chunk)
