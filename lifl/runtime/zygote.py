"""A fork server for aggregator functions: cold starts in milliseconds, not a Python start-up.

Starting ``python -m lifl.function`` costs ~150 ms (interpreter + numpy import),
which would make every scale-up an event-to-fold delay of that size. The zygote
is started once, imports what a function needs, then sleeps in ``recvmsg``
(no CPU, folds nothing, holds no memory of any round). To start a function the
runtime sends it one end of a fresh socketpair (SCM_RIGHTS); the zygote forks,
the child serves that socket, and the zygote answers with the child's pid.

Lifetimes: the zygote gets SIGKILL when the server dies, a function when the
zygote dies (PR_SET_PDEATHSIG both ways), and SIGCHLD is ignored so the kernel
reaps exited functions. The zygote is single-threaded, so forking it is safe.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import sys

from .. import fold  # noqa: F401  (imported here so that children start warm)
from .. import function


def serve(ctrl: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 1)
        except OSError:
            return
        if not msg:
            return
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:  # the new function
            try:
                ctrl.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                function.run_on_fd(fds[0])
            finally:
                os._exit(0)
        os.close(fds[0])
        ctrl.sendall(struct.pack("<i", pid))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="LIFL function fork server (started by the local runtime)")
    p.add_argument("--fd", type=int, required=True)
    args = p.parse_args(argv)
    function._die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctrl = socket.socket(fileno=args.fd)
    ctrl.sendall(b"R")
    serve(ctrl)
    sys.exit(0)


if __name__ == "__main__":
    main()
