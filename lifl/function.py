"""One aggregator function: a separate OS process that folds shared-memory slots.

It owns nothing: every segment is created by the server and only attached
here (cached by name, since slots are reused), so a SIGKILL leaks no memory.
Commands arrive as JSON lines on an inherited Unix socket, one at a time;
each is answered with ``{"seq": n, "ok": true, ...}`` or an error. No pickle.

Commands (a round's first one on a function carries its layout): ``fold``
(updates or child partials into an accumulator, in place and journaled: from its
committed generation or from zero), ``finalize``
(accumulator / total weight -> native-dtype result), ``forget`` (drop cached
mappings), ``exit``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
import time

import numpy as np

from . import fold, serverstep
from .engine.optimizers import ServerOptimizer
from .layout import Layout
from .shm import Segment


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the server dies, so no orphan keeps mappings alive."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass


class _Given:
    """A buffer the runtime handed over for one command (an imported partial or update, or
    an output to return), standing in for a segment of that name."""

    def __init__(self, arr: np.ndarray):
        self.buf = memoryview(arr).cast("B")

    def array(self, dtype=np.uint8, count: int = -1, offset: int = 0) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=dtype, count=count, offset=offset)


class Function:
    """``local_prefixes``: where segments may be attached from (the Ray runtime passes its
    node's arenas, so a segment of another node is an error, never a silent remote read)."""

    def __init__(self, local_prefixes: tuple[str, ...] | None = None):
        self.layouts: dict[int, Layout] = {}
        self.segments: dict[str, Segment] = {}
        self.views: dict[tuple[str, int], fold.UpdateViews] = {}
        self.given: dict[str, np.ndarray] = {}
        self.local_prefixes = local_prefixes

    def seg(self, name: str) -> "Segment | _Given":
        if name in self.given:
            return _Given(self.given[name])
        if self.local_prefixes is not None and not name.startswith(self.local_prefixes):
            raise ValueError(f"segment {name} belongs to another node; the runtime must import it")
        s = self.segments.get(name)
        if s is None:
            s = self.segments[name] = Segment.attach(name, prefault=True)
        return s

    def _step_writer(self, st: dict, layout: Layout, weight: float, out):
        """The ``write`` of a finalize with a server step (lifl.serverstep): round mode steps from
        the initial model ``base``; delta mode (asynchronous jobs) from the float64 master copy
        ``x_in``, writing the next master copy ``x_out`` too."""
        opt, t = ServerOptimizer(**st["opt"]), int(st["t"])
        state = self.seg(st["state"]).buf
        serverstep.check_before(state, t)
        master = None
        if "x_in" in st:   # delta mode: the mean of the deltas is over Σw, not the fold weights Σws
            master = (self.seg(st["x_in"]).array(np.float64, layout.numel),
                      self.seg(st["x_out"]).array(np.float64, layout.numel))
            weight = float(st["w"])
        return serverstep.step_writer(opt, layout, t, weight, state, out, base_buf=self.seg(st["base"]).buf
                                      if master is None else None, master=master,
                                      moments=st.get("moments", "float64"))

    def acc(self, name: str, layout: Layout) -> np.ndarray:
        return self.seg(name).array(np.float64, layout.numel)

    def journal(self, name: str, layout: Layout) -> fold.Journal:
        return fold.Journal(self.seg(name).buf, layout.numel)

    def update_views(self, name: str, lid: int) -> fold.UpdateViews:
        if name in self.given:  # an imported update: valid for this command only
            return fold.UpdateViews(self.layouts[lid], self.seg(name).buf)
        v = self.views.get((name, lid))
        if v is None:
            v = self.views[(name, lid)] = fold.UpdateViews(self.layouts[lid], self.seg(name).buf)
        return v

    def _inputs(self, cmd: dict, layout: Layout):
        """The ``add`` of a command's inputs: client updates, or children's partial sums."""
        ups = cmd.get("updates", [])
        if ups:
            return fold.add_updates(layout, [self.update_views(n, cmd["layout"]) for n, _ in ups],
                                    [w for _, w in ups])
        return fold.add_partials([self.acc(n, layout) for n in cmd.get("partials", [])])

    def handle(self, cmd: dict) -> dict:
        op = cmd["op"]
        if "specs" in cmd:  # first command of a round on this function carries its layout
            self.layouts[cmd["layout"]] = Layout.from_wire(cmd["specs"])
        if op == "fold":  # in place, journaled: a fold cut short is re-run exactly (fold.Journal)
            layout = self.layouts[cmd["layout"]]
            t0 = time.perf_counter()
            fold.fold_in_place(self.acc(cmd["acc"], layout), self.journal(cmd["journal"], layout),
                               cmd["gen"], cmd.get("from"), self._inputs(cmd, layout))
            if cmd.get("delay_s"):  # fault injection (fault_fold_delay_s): a window to be killed mid-command
                time.sleep(float(cmd["delay_s"]))
            return {"seconds": time.perf_counter() - t0}
        if op == "finalize":  # with inputs: the last fold and the finalize in one pass
            layout = self.layouts[cmd["layout"]]
            t0 = time.perf_counter()
            out = self.seg(cmd["out"]).buf
            if "span" in cmd:   # one span of a flat finalize: reads every sum and pending update
                ups = cmd["updates"]
                add = fold.add_updates(layout, [self.update_views(n, cmd["layout"]) for n, _ in ups],
                                       [w for _, w in ups]) if ups else None
                st = cmd.get("step")
                write = self._step_writer(st, layout, cmd["weight"], out) if st is not None else None
                fold.finalize_span(layout, *cmd["span"], [self.acc(n, layout) for n in cmd["partials"]], add,
                                   cmd["weight"], out, write)
                if st is not None:   # any span may commit: the others read the untouched copy of step t
                    serverstep.commit(self.seg(st["state"]).buf, int(st["t"]))
                return {"seconds": time.perf_counter() - t0}
            acc = self.acc(cmd["acc"], layout)
            weight, st = cmd["weight"], cmd.get("step")
            if st is not None:   # a server optimizer fused into the pass: float64, exactly once
                write = self._step_writer(st, layout, weight, out)
                if "gen" in cmd:   # the sum's last inputs are added in a cache-sized scratch, never written
                    # back: the step reads its inputs only, so a re-run (a replacement function) is exact
                    fold.finalize_span(layout, 0, layout.numel, [acc] if cmd.get("from") is not None else [],
                                       self._inputs(cmd, layout), weight, out, write)
                else:
                    for e0 in range(0, layout.numel, fold.PIECE):
                        e1 = min(layout.numel, e0 + fold.PIECE)
                        write(acc[e0:e1], e0, e1)
                serverstep.commit(self.seg(st["state"]).buf, int(st["t"]))
            elif "gen" in cmd:
                fold.fold_and_finalize(acc, self.journal(cmd["journal"], layout), cmd["gen"], cmd.get("from"),
                                       self._inputs(cmd, layout), layout, weight, out)
            else:
                fold.finalize(acc, layout, weight, out)
            return {"seconds": time.perf_counter() - t0}
        if op == "forget":
            for name in cmd["segments"]:
                for key in [k for k in self.views if k[0] == name]:
                    del self.views[key]
                seg = self.segments.pop(name, None)
                if seg is not None:
                    seg.close()
            for lid in cmd.get("layouts", []):
                self.layouts.pop(lid, None)
                for key in [k for k in self.views if k[1] == lid]:
                    del self.views[key]
            return {}
        raise ValueError(f"unknown op {op!r}")


def _lines(sock: socket.socket, rfile, poll_s: float):
    """Command lines from the socket; with poll_s > 0, wake up every poll_s seconds while idle
    (how an always-on, polling aggregator behaves: only the serverful baseline uses it)."""
    if poll_s <= 0:
        yield from rfile
        return
    import select
    while True:
        while not select.select([sock], [], [], poll_s)[0]:
            pass
        line = rfile.readline()
        if not line:
            return
        yield line


def _inline(rfile, cmd: dict) -> dict[str, np.ndarray]:
    """Update bytes sent after the command line (``update_transport = "pipe"``, an ablation):
    ``cmd["inline"]`` lists each slot's name and size, in order."""
    out = {}
    for name, size in cmd.get("inline", ()):
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = rfile.readinto(view[got:])
            if not n:
                raise EOFError("the command's update bytes were cut short")
            got += n
        out[name] = np.frombuffer(buf, np.uint8)
    return out


def serve(sock: socket.socket) -> None:
    fn = Function()
    rfile = sock.makefile("rb")
    for line in _lines(sock, rfile, float(os.environ.get("LIFL_FUNCTION_POLL_S", "0") or 0)):
        cmd = json.loads(line)
        if cmd.get("op") == "exit":
            break
        fn.given = _inline(rfile, cmd)
        try:
            reply = {"seq": cmd.get("seq"), "ok": True, **fn.handle(cmd)}
        except Exception as e:  # report, keep serving: the dispatcher decides
            reply = {"seq": cmd.get("seq"), "ok": False, "error": f"{type(e).__name__}: {e}"}
        fn.given = {}
        sock.sendall(json.dumps(reply).encode() + b"\n")


def run_on_fd(fd: int) -> None:
    """Serve commands on the inherited socket ``fd`` until told to exit or it closes."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us explicitly
    sock = socket.socket(fileno=fd)
    sock.sendall(json.dumps({"seq": 0, "ok": True, "ready": os.getpid()}).encode() + b"\n")
    try:
        serve(sock)
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="LIFL aggregator function (started by the runtime)")
    p.add_argument("--fd", type=int, required=True)
    run_on_fd(p.parse_args(argv).fd)
    sys.exit(0)


if __name__ == "__main__":
    main()
