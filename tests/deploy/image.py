"""What deploy/Dockerfile's final stage says: ENV, WORKDIR, USER, EXPOSE, COPY, ENTRYPOINT/CMD."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    expose: list[int] = field(default_factory=list)
    copies: list[tuple[str, str]] = field(default_factory=list)  # (source, destination) from the context
    command: list[str] = field(default_factory=list)               # ENTRYPOINT + CMD


def final_stage(path: Path) -> Stage:
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        if not cur and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        cur += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(cur.strip())
            cur = ""
    stage, entry, cmd = Stage(), [], []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            stage, entry, cmd = Stage(), [], []
        elif op == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                stage.env[k] = v
        elif op == "WORKDIR":
            stage.workdir = rest.strip()
        elif op == "USER":
            stage.user = rest.strip()
        elif op == "EXPOSE":
            stage.expose = [int(p.split("/")[0]) for p in rest.split()]
        elif op == "COPY" and "--from" not in rest:
            *src, dst = rest.split()
            stage.copies.extend((s, dst) for s in src)
        elif op == "ENTRYPOINT":
            entry = json.loads(rest)
        elif op == "CMD":
            cmd = json.loads(rest)
    stage.command = entry + cmd
    return stage
