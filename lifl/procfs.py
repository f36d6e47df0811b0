"""Process trees, CPU-seconds and PSS from /proc (Linux), for the simulator, harnesses and benchmarks:
no psutil needed."""
from __future__ import annotations

import os
from typing import Sequence


def children_map() -> dict[int, list[int]]:
    """Every live process's children, by parent pid."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def process_tree(roots: Sequence[int]) -> list[int]:
    """The roots and all their descendants."""
    kids = children_map()
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = False) -> float | None:
    """utime + stime of a process (+ its reaped children's with ``children``); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    v = s[s.rindex(b")") + 2:].split()
    ticks = int(v[11]) + int(v[12]) + (int(v[13]) + int(v[14]) if children else 0)
    return ticks / _TICK


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split among their users, so sums over processes are
    honest); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
