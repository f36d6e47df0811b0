"""The malloc policy of LIFL's own processes (``lifl.malloc_policy``): bursts of chunk-sized
buffers, as gRPC allocates them for concurrent streams, stop faulting pages in once it is set.
Each case runs in a fresh interpreter (the policy is process-wide and has no undo)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")

CHILD = r"""
import json, resource, sys, threading
if sys.argv[1] == "keep":
    from lifl.malloc_policy import keep_buffers
    assert keep_buffers()

def bursts(out):
    def burst():   # four streams' 2 MiB chunks alive at once, then freed
        held = [b"\1" * (2 << 20) for _ in range(4)]
        del held
    burst()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(20):
        burst()
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

out = []
t = threading.Thread(target=bursts, args=(out,))   # a thread's arena, like gRPC's poller
t.start()
t.join()
bursts(out)                                         # and the main heap
print(json.dumps(out))
"""

PAGES = 20 * 4 * (2 << 20) // 4096   # pages the bursts write


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_kept_buffers_fault_no_pages_in():
    plain, kept = _faults("plain"), _faults("keep")
    assert all(f > PAGES // 2 for f in plain), (plain, PAGES)   # without it: (most) pages fault in anew
    assert all(f < PAGES // 100 for f in kept), (kept, PAGES)
