"""The gateway pool's call channel (``lifl.pool_channel``) on a real Unix socket: the secret is
required, refusals keep their status, a bug is INTERNAL with a logged id, garbage ends only its own
connection, and a call that waits holds up no other thread's call."""
from __future__ import annotations

import logging
import socket
import struct
import threading

import pytest

from lifl.errors import LiflError
from lifl.pool_channel import FrameLink, FrameServer, recv_frame, send_frame
from lifl.rounds import Digest, Duplicate

SECRET = "s3cret"


class Handler:
    def __init__(self):
        self.release = threading.Event()
        self.calls = []

    def __call__(self, req: dict) -> dict:
        self.calls.append(req["op"])
        if req["op"] == "echo":
            return {"echo": req["x"]}
        if req["op"] == "refuse":
            raise LiflError("RESOURCE_EXHAUSTED", "budget full; retry later", retry_after_s=0.5)
        if req["op"] == "duplicate":
            raise Duplicate("already pushed", Digest(weight=2.0, encoding=1, size=4, hash=7), 1)
        if req["op"] == "wait":
            assert self.release.wait(10)
            return {"waited": True}
        if req["op"] == "bug":
            raise RuntimeError("a bug")
        return {"missing": req["no-such-key"]}


@pytest.fixture
def served(tmp_path):
    h = Handler()
    with FrameServer(str(tmp_path / "calls.sock"), SECRET, h) as srv:
        link = FrameLink(srv.path, SECRET, timeout_s=10.0)
        yield srv, link, h
        link.close()


def test_calls_and_refusals_keep_their_status(served, caplog):
    srv, link, h = served
    assert link({"op": "echo", "x": [1, "ü"]}) == {"ok": True, "echo": [1, "ü"]}
    rep = link({"op": "refuse"})
    assert (rep["ok"], rep["code"], rep["retry_after_s"]) == (False, "RESOURCE_EXHAUSTED", 0.5)
    rep = link({"op": "duplicate"})
    assert rep["code"] == "ALREADY_EXISTS" and rep["prior"] == {"weight": 2.0, "encoding": 1, "size": 4, "hash": 7} and rep["accepted"] == 1
    assert link({"op": "other"})["code"] == "INVALID_ARGUMENT"   # a malformed call
    with caplog.at_level(logging.ERROR, logger="lifl.pool_channel"):
        rep = link({"op": "bug"})
    assert rep["code"] == "INTERNAL"
    eid = rep["message"].split("internal error ")[1].split()[0]
    assert any(eid in r.getMessage() for r in caplog.records)
    assert link({"op": "echo", "x": 2})["echo"] == 2   # the connection goes on after all of them


def test_a_connection_without_the_secret_is_closed_unanswered(served):
    srv, link, h = served
    with pytest.raises(ConnectionError):
        FrameLink(srv.path, "wrong", timeout_s=5.0)({"op": "echo", "x": 1})
    assert h.calls == []
    assert link({"op": "echo", "x": 1})["ok"]


def test_garbage_ends_only_its_own_connection(served):
    srv, link, h = served
    for junk in (struct.pack("!I", 1 << 30), struct.pack("!I", 3) + b"[1]", b"\x00\x00"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(srv.path)
            send_frame(s, {"secret": SECRET})
            assert recv_frame(s) == {"ok": True}
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""   # closed by the server, nothing answered
    assert h.calls == []
    assert link({"op": "echo", "x": 3})["echo"] == 3


def test_a_waiting_call_holds_up_no_other_thread(served):
    srv, link, h = served
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("w", link({"op": "wait"})))
    t.start()
    while "wait" not in h.calls:   # the waiting call has reached the server
        threading.Event().wait(0.01)
    assert link({"op": "echo", "x": 4})["echo"] == 4   # another thread, its own connection
    h.release.set()
    t.join(10)
    assert out["w"] == {"ok": True, "waited": True}


def test_a_closed_server_is_an_error_not_a_hang(tmp_path):
    h = Handler()
    srv = FrameServer(str(tmp_path / "c.sock"), SECRET, h).start()
    link = FrameLink(srv.path, SECRET, timeout_s=5.0)
    assert link({"op": "echo", "x": 5})["ok"]
    srv.close()
    with pytest.raises(ConnectionError):
        link({"op": "echo", "x": 6})
    link.close()
