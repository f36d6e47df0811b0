"""The gateway pool's call channel: JSON frames over a Unix stream socket, a connection per thread.

A pooled push asks its parent twice (``begin``, ``accept``). As unary gRPC calls on
the parent's server, each cost the parent ~0.4 ms of CPU in gRPC's own machinery
(its polling thread, its event engine, a thread-pool handoff: 1.7 ms of parent CPU
per push measured on 2 cores, about 1.2 of it gRPC's), and the parent is one
interpreter deciding for every process. Here a call is one length-prefixed JSON
frame each way on a connection its calling thread keeps; the parent reads it on
a thread of that connection, decides, answers. A call that waits (for a slot)
holds only its own connection. The socket lives in the pool's 0700 directory and
a connection's first frame must carry the pool's secret. No pickle.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import struct
import threading
from typing import Callable

from .errors import LiflError
from .rounds import Duplicate

log = logging.getLogger("lifl.pool_channel")

_LEN = struct.Struct("!I")
MAX_FRAME = 1 << 20   # a call is a few hundred bytes; anything near this is not one of ours


class ChannelClosed(ConnectionError):
    """The other side closed the connection (or sent something that is not a frame)."""


def send_frame(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_frame(sock: socket.socket) -> dict | None:
    """The next frame's message; None at a clean end of the stream."""
    head = _recv_exact(sock, _LEN.size, eof_ok=True)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ChannelClosed(f"a frame of {n} bytes (at most {MAX_FRAME})")
    msg = json.loads(_recv_exact(sock, n))
    if not isinstance(msg, dict):
        raise ChannelClosed("a frame that is not a JSON object")
    return msg


def _recv_exact(sock: socket.socket, n: int, eof_ok: bool = False) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise ChannelClosed("the connection closed mid-frame")
        got += k
    return bytes(buf)


def answer(handle: Callable[[dict], dict], req: dict) -> dict:
    """``handle``'s reply with ``ok``; a refusal (:class:`LiflError`) as its code and message, a
    malformed call as INVALID_ARGUMENT, anything else as INTERNAL with an id that is also logged."""
    try:
        return {"ok": True, **handle(req)}
    except LiflError as e:
        rep = {"ok": False, "code": e.code, "message": e.message, "retry_after_s": e.retry_after_s}
        if isinstance(e, Duplicate) and e.prior is not None:   # the caller compares a resend's content
            rep.update(prior=e.prior.to_dict(), accepted=e.accepted)
        return rep
    except (ValueError, KeyError, TypeError) as e:
        return {"ok": False, "code": "INVALID_ARGUMENT", "message": f"bad call {str(req.get('op'))[:32]!r}: {e}"}
    except Exception as e:   # a bug: loud, and the caller gets an answer rather than a hang
        eid = os.urandom(4).hex()
        log.error("internal error %s in pool call %r", eid, str(req.get("op"))[:32], exc_info=e)
        return {"ok": False, "code": "INTERNAL", "message": f"internal error {eid} in the gateway pool's parent; "
                                                             "it logged it under this id"}


class FrameServer:
    """Serves ``handle`` (``dict -> dict``, refusals raised as :class:`LiflError`) at ``path`` to
    callers that present ``secret``: a thread per connection, for as long as it stays open."""

    def __init__(self, path: str, secret: str, handle: Callable[[dict], dict], name: str = "lifl-pool-calls"):
        self.path, self.handle, self.name = path, handle, name
        self._secret = secret.encode()
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def __enter__(self) -> "FrameServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "FrameServer":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(256)
        self._sock = s
        threading.Thread(target=self._accept, name=self.name, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                log.exception("%s: accept failed; going on", self.name)
                continue
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            hello = recv_frame(conn)
            if hello is None or not hmac.compare_digest(str(hello.get("secret", "")).encode(), self._secret):
                log.warning("%s: a connection without this pool's secret; closed", self.name)
                return
            send_frame(conn, {"ok": True})
            while True:
                req = recv_frame(conn)
                if req is None:
                    return
                send_frame(conn, answer(self.handle, req))
        except (OSError, ValueError) as e:   # the caller died, or sent garbage: this connection ends
            if not self._closed.is_set():
                log.info("%s: connection ended: %s", self.name, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)   # wakes the accept
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FrameLink:
    """The calling side: ``link(req) -> reply``. Each thread keeps a connection of its own, so a
    call that waits at the parent (a slot) holds up no other; a broken connection is dropped and
    the error raised (a call is not repeated: ``begin`` and ``accept`` are not idempotent)."""

    def __init__(self, path: str, secret: str, timeout_s: float):
        self.path, self.secret, self.timeout_s = path, secret, timeout_s
        self._local = threading.local()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def __call__(self, req: dict) -> dict:
        conn = self._conn()
        try:
            send_frame(conn, req)
            rep = recv_frame(conn)
            if rep is None:
                raise ChannelClosed("the gateway pool's parent closed the connection")
            return rep
        except (OSError, ValueError):
            self._drop(conn)
            raise

    def _conn(self) -> socket.socket:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(self.timeout_s)
            conn.connect(self.path)
            send_frame(conn, {"secret": self.secret})
            if recv_frame(conn) is None:
                raise ChannelClosed("the gateway pool's parent refused this connection")
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._conns.add(conn)
        self._local.conn = conn
        return conn

    def _drop(self, conn: socket.socket) -> None:
        self._local.conn = None
        with self._lock:
            self._conns.discard(conn)
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            c.close()
