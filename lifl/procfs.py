"""Process trees from /proc (Linux), for the test harnesses and benchmarks: no psutil needed."""
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
