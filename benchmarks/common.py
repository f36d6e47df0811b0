"""Shared benchmark plumbing: interleaving, medians, the printed table, JSON output,
model layouts, and the server launcher (the /proc sampler is ``benchmarks.procsampler``).

Every benchmark measures LIFL ("ours") and a peer in the same run, interleaved
A B A B …, and reports the median of the per-repetition ratios ours/peer with
the raw medians of both sides beside it. This machine is shared and noisy, so
absolute numbers are only context; the ratios are the result.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

MiB = 2**20
MB = 10**6
ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench-out"


# -- arguments ------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (< 60 s; for CI smoke runs)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions per case (>= 5 for reported figures)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path (default bench-out/<bench>.json)")
    return p


# -- model layouts ------------------------------------------------------------------------
def _bn(out: dict, prefix: str, c: int) -> None:
    out[f"{prefix}.weight"] = ("float32", (c,))
    out[f"{prefix}.bias"] = ("float32", (c,))
    out[f"{prefix}.running_mean"] = ("float32", (c,))
    out[f"{prefix}.running_var"] = ("float32", (c,))
    out[f"{prefix}.num_batches_tracked"] = ("int64", ())


def _resnet_specs(blocks: Sequence[int], bottleneck: bool, num_classes: int = 1000) -> dict:
    """torchvision ResNet state_dict names and shapes (v1.5: stride on the 3x3 conv)."""
    s: dict[str, tuple[str, tuple[int, ...]]] = {"conv1.weight": ("float32", (64, 3, 7, 7))}
    _bn(s, "bn1", 64)
    exp = 4 if bottleneck else 1
    inplanes = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            stride = 2 if (b == 0 and li > 1) else 1
            p = f"layer{li}.{b}"
            if bottleneck:
                s[f"{p}.conv1.weight"] = ("float32", (planes, inplanes, 1, 1)); _bn(s, f"{p}.bn1", planes)
                s[f"{p}.conv2.weight"] = ("float32", (planes, planes, 3, 3)); _bn(s, f"{p}.bn2", planes)
                s[f"{p}.conv3.weight"] = ("float32", (planes * exp, planes, 1, 1)); _bn(s, f"{p}.bn3", planes * exp)
            else:
                s[f"{p}.conv1.weight"] = ("float32", (planes, inplanes, 3, 3)); _bn(s, f"{p}.bn1", planes)
                s[f"{p}.conv2.weight"] = ("float32", (planes, planes, 3, 3)); _bn(s, f"{p}.bn2", planes)
            if stride != 1 or inplanes != planes * exp:
                s[f"{p}.downsample.0.weight"] = ("float32", (planes * exp, inplanes, 1, 1))
                _bn(s, f"{p}.downsample.1", planes * exp)
            inplanes = planes * exp
    s["fc.weight"] = ("float32", (num_classes, 512 * exp))
    s["fc.bias"] = ("float32", (num_classes,))
    return s


_SPECS = {
    "resnet18": lambda: _resnet_specs((2, 2, 2, 2), False),
    "resnet34": lambda: _resnet_specs((3, 4, 6, 3), False),
    "resnet152": lambda: _resnet_specs((3, 8, 36, 3), True),
    "mlp1m": lambda: {"fc1.weight": ("float32", (1024, 784)), "fc1.bias": ("float32", (1024,)),
                      "fc2.weight": ("float32", (256, 1024)), "fc2.bias": ("float32", (256,)),
                      "fc3.weight": ("float32", (10, 256)), "fc3.bias": ("float32", (10,))},
}


def model_arrays(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A model's named tensors with real layer shapes (lifl.zoo when present, else a private copy)."""
    try:
        from lifl import zoo  # type: ignore[attr-defined]
        return zoo.layout_arrays(name, seed=seed)
    except (ImportError, AttributeError):
        pass
    rng = np.random.default_rng(seed)
    out = {}
    for k, (dt, shape) in _SPECS[name]().items():
        if dt == "int64":
            out[k] = np.array(int(rng.integers(0, 10_000)), dtype=np.int64).reshape(shape)
        else:
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
            if k.endswith("running_var"):
                a = np.abs(a) + np.float32(1.0)
            out[k] = a
    return out


def perturbed(base: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """A distinct client update (own memory) derived cheaply from ``base``."""
    out = {}
    d = np.float32(1e-3 * (i % 997 + 1))
    for k, v in base.items():
        out[k] = np.asarray((v + d) if v.dtype.kind == "f" else (v + (i % 7)), dtype=v.dtype).reshape(v.shape)
    return out


def model_bytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


# -- Flower (the peer) -------------------------------------------------------------------------
def flower_reply(arrays: dict[str, np.ndarray], num_examples: float, node_id: int, server_round: int = 1):
    """A real flwr 1.42 reply Message as the ServerApp receives it: ArrayRecord + MetricRecord('num-examples').

    Arrays become flwr ``Array`` objects (``.npy`` bytes), exactly what a
    ClientApp's ``ArrayRecord(model.state_dict())`` turns into once it arrives.
    """
    from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": num_examples})})
    md = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                  reply_to_message_id=f"i{node_id}", group_id=str(server_round), created_at=time.time(),
                  ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=md)


def flower_aggregate(replies, server_round: int = 1):
    """Flower's own FedAvg aggregation of train replies (flwr.serverapp.strategy.FedAvg.aggregate_train)."""
    import logging

    from flwr.serverapp.strategy import FedAvg

    logging.getLogger("flwr").setLevel(logging.WARNING)
    return FedAvg().aggregate_train(server_round, replies)


# -- measurement ----------------------------------------------------------------------------
def interleave(cases: Sequence[tuple[str, Callable[[], Any]]], reps: int, warmup: int = 1,
               progress: bool = True) -> dict[str, list[Any]]:
    """Run the cases A B C A B C … ``reps`` times after ``warmup`` unrecorded rounds."""
    out: dict[str, list[Any]] = {name: [] for name, _ in cases}
    for r in range(warmup + reps):
        for name, fn in cases:
            v = fn()
            if r >= warmup:
                out[name].append(v)
        if progress:
            tag = "warm-up" if r < warmup else f"rep {r - warmup + 1}/{reps}"
            print(f"  .. {tag} done", file=sys.stderr, flush=True)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def paired_ratio(ours: Sequence[float], peer: Sequence[float]) -> float:
    """Median of per-repetition ratios (ours[i] / peer[i]): robust to drift on a shared machine."""
    return median([a / b for a, b in zip(ours, peer) if b])


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["mem_total_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    info["numpy"] = np.__version__
    try:
        import flwr
        info["flwr"] = flwr.__version__ if hasattr(flwr, "__version__") else _pkg_version("flwr")
    except Exception:
        info["flwr"] = _pkg_version("flwr")
    info["grpcio"] = _pkg_version("grpcio")
    try:
        from lifl import fold
        info["lifl_c_kernel"] = fold.have_c_kernel()
    except Exception:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=5).stdout.strip()
    except Exception:
        pass
    return info


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# -- report ----------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    metric: str
    ratio: float
    goal: str
    met: bool | None
    ours: float
    peer: float
    unit: str
    ours_label: str = "LIFL"
    peer_label: str = "peer"
    n: int = 0
    note: str = ""


@dataclass
class Report:
    bench: str
    title: str
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, case: str, metric: str, ours: Sequence[float], peer: Sequence[float], unit: str,
            goal: str = "", better: str = "", threshold: float | None = None, ours_label: str = "LIFL",
            peer_label: str = "peer", scale: float = 1.0, note: str = "") -> Row:
        """Add a row from paired samples; ``better`` is 'higher' or 'lower' when a goal applies."""
        ratio = paired_ratio(ours, peer)
        met = None
        if threshold is not None:
            met = ratio >= threshold if better == "higher" else ratio <= threshold
        row = Row(case, metric, ratio, goal, met, median(ours) * scale, median(peer) * scale, unit,
                  ours_label, peer_label, min(len(ours), len(peer)), note)
        self.rows.append(row)
        self.raw[f"{case}|{metric}"] = {"ours": list(ours), "peer": list(peer)}
        return row

    def print(self) -> None:
        print()
        print(f"== {self.title}")
        for k, v in self.params.items():
            print(f"   {k}: {v}")
        head = ["case", "metric", "ratio", "goal", "ok", "LIFL side (median)", "peer side (median)", "n"]
        lines = []
        for r in self.rows:
            ok = "-" if r.met is None else ("yes" if r.met else "NO")
            lines.append([r.case, r.metric, _fmt(r.ratio, 3), r.goal or "-", ok,
                          f"{r.ours_label}: {_fmt(r.ours)} {r.unit}", f"{r.peer_label}: {_fmt(r.peer)} {r.unit}",
                          str(r.n)])
        widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        print("  ".join("-" * w for w in widths))
        for l in lines:
            print("  ".join(c.ljust(w) for c, w in zip(l, widths)))
        for r in self.rows:
            if r.note:
                print(f"   [{r.case} / {r.metric}] {r.note}")
        for n in self.notes:
            print(f"   note: {n}")
        print()

    def write(self, path: Path | None = None) -> Path:
        path = path or OUT_DIR / f"{self.bench}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"bench": self.bench, "title": self.title,
               "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(time.time() - self.started, 1), "machine": machine(), "params": self.params,
               "rows": [r.__dict__ for r in self.rows], "notes": self.notes, "samples": self.raw}
        path.write_text(json.dumps(doc, indent=1, default=_json_default))
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


# -- servers in their own processes ----------------------------------------------------------------
class ServerProc:
    """A LIFL embedded server or a grpcio null sink in a child process (``python -m benchmarks.common``).

    The child prints ``ADDR host:port`` once it listens and stops when its stdin closes,
    so its CPU and memory are its own and the benchmark process only plays the clients.
    """

    def __init__(self, kind: str, env: dict[str, str] | None = None, root: Path = ROOT, **cfg: Any):
        """``root``: the checkout whose code the child runs (another one: a before/after comparison)."""
        cmd = [sys.executable, "-m", "benchmarks.common", kind, json.dumps(cfg)]
        if root != ROOT:
            path = os.pathsep.join([str(Path(root).resolve()), os.environ.get("PYTHONPATH", "")])
            env = {**(env or {}), "PYTHONPATH": path}
        self.proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline().strip()
        if not line.startswith("ADDR "):
            self.proc.kill()
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        self.address = line.split()[1]
        self.metrics_port = int(line.split()[2]) if len(line.split()) > 2 else -1
        self.pid = self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProc":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pin_from_env() -> None:
    """``LIFL_BENCH_CPUS=0-7`` (a list of ranges): run this server, and what it starts, on those cores."""
    spec = os.environ.get("LIFL_BENCH_CPUS", "")
    if spec:
        os.sched_setaffinity(0, cpu_list(spec))


def cpu_list(spec: str) -> set[int]:
    """``"0-3,8"`` -> {0, 1, 2, 3, 8}."""
    out: set[int] = set()
    for part in spec.split(","):
        if part:
            a, _, b = part.partition("-")
            out.update(range(int(a), int(b or a) + 1))
    return out


def _serve_lifl(cfg: dict) -> None:
    _pin_from_env()
    from lifl.config import ServerConfig
    from lifl.server import EmbeddedServer

    conf = ServerConfig(**{"port": 0, "metrics_port": -1, **cfg})
    from lifl import malloc_policy
    malloc_policy.apply(conf)   # what `lifl serve` does in its own process
    with EmbeddedServer(conf) as srv:
        print(f"ADDR {srv.address} {srv.metrics_port}", flush=True)
        sys.stdin.read()


def null_sink_server(max_msg: int = 16 * MiB, threads: int = 32, port: int = 0, reuseport: bool = False):
    """A bare grpcio server whose Push (stream-unary, identity deserializer) only counts bytes."""
    from concurrent import futures

    import grpc

    counted = {"bytes": 0, "streams": 0}

    def push(it, context):
        n = 0
        for m in it:
            n += len(m)
        counted["bytes"] += n
        counted["streams"] += 1
        return b""  # an empty PushReply

    handler = grpc.method_handlers_generic_handler(
        "lifl.v1.Aggregation", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), handlers=[handler],
                      options=[("grpc.max_receive_message_length", max_msg), ("grpc.so_reuseport", int(reuseport))])
    port = srv.add_insecure_port(f"127.0.0.1:{port}")
    srv.start()
    return srv, f"127.0.0.1:{port}", counted


def _serve_null(cfg: dict) -> None:
    """``keep_buffers``: with the malloc policy LIFL's own processes apply (a diagnostic peer)."""
    _pin_from_env()
    if cfg.pop("keep_buffers", False):
        from lifl.malloc_policy import keep_buffers
        keep_buffers()
    srv, addr, _ = null_sink_server(**cfg)
    print(f"ADDR {addr}", flush=True)
    sys.stdin.read()
    srv.stop(0)


if __name__ == "__main__":
    kind, conf = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    {"lifl": _serve_lifl, "null": _serve_null}[kind](conf)
