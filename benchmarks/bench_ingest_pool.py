"""Ingest with many clients: LIFL with N gateway processes ÷ one gateway process, and ÷ N
grpcio null-sink processes on one port (SO_REUSEPORT), same client processes, one run
(issue 17: goals >= 4x and >= 0.9x with N = 8).

Servers run in their own processes pinned to ``--server-cpus`` (the pool's gateway
processes and aggregator functions inherit it); the clients are ``--clients`` processes
pinned to ``--client-cpus``, each pushing over ``--conns`` connections of its own (what
many devices would open; the kernel spreads connections, not calls, over the processes of
a port). A sample: every client pushes ``--pushes`` updates (``lifl.client.Client.push``);
for LIFL into one round opened for all of them. ``ingest`` stops the clock at the last
acknowledgement (every update is in a slot and accepted); ``--e2e`` stops it when the
round's result can be pulled (1,000 clients x ResNet-18: ``--model resnet18 --clients 16
--pushes 63 --e2e``).

    python -m benchmarks.bench_ingest_pool [--processes 8] [--clients 16] [--quick]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from lifl.client import Client
from lifl.layout import Layout
from lifl.procfs import children_map, cpu_seconds

from .common import ROOT, Report, ServerProc, cpu_list, interleave, median, model_arrays, parser


@dataclass(frozen=True)
class TreeCpu:
    """CPU-seconds of a server's process tree by role, and how long its threads waited for a CPU."""
    head: float = 0.0
    pool: float = 0.0        # the pool's gateway processes
    functions: float = 0.0   # everything else under the head: zygotes and aggregator functions
    runq_wait: float = 0.0   # seconds runnable but not running, summed over every thread (schedstat)

    def __sub__(self, o: "TreeCpu") -> "TreeCpu":
        return TreeCpu(*(a - b for a, b in zip(astuple(self), astuple(o))))

    @property
    def rest(self) -> float:
        return self.pool + self.functions


def _runq_wait(pid: int) -> float:
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                total += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        pass
    return total / 1e9


def tree_cpu(pid: int) -> TreeCpu:
    """``pid``'s CPU and its descendants' by role (from /proc). A process's own time counts
    with its reaped children's, so functions that exited within a sample are not lost."""
    kids = children_map()
    head = cpu_seconds(pid) or 0.0
    pool = functions = 0.0
    wait = _runq_wait(pid)
    todo = list(kids.get(pid, []))
    while todo:
        q = todo.pop()
        try:
            is_pool = b"lifl.pool_gateway" in open(f"/proc/{q}/cmdline", "rb").read()
        except OSError:
            continue
        c = cpu_seconds(q, children=True) or 0.0
        if is_pool:
            pool += c
        else:
            functions += c
        wait += _runq_wait(q)
        todo += kids.get(q, [])
    return TreeCpu(head, pool, functions, wait)


# -- client processes -----------------------------------------------------------------------------
def _worker() -> None:
    """A client process: reads ``{"address", "round", "tag", "n"}`` lines, pushes ``n`` updates
    round-robin over its connections, answers ``done``."""
    spec = json.loads(sys.stdin.readline())
    if spec["cpus"]:
        os.sched_setaffinity(0, cpu_list(spec["cpus"]))
    arrays = model_arrays(spec["model"], seed=spec["index"])
    clients: dict[str, list[Client]] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        conns = clients.get(cmd["address"])
        if conns is None:
            conns = clients[cmd["address"]] = [
                Client(cmd["address"], chunk_size=spec["chunk_mib"] * 2**20,
                       channel_options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(spec["conns"])]
        for i in range(cmd["n"]):
            conns[i % len(conns)].push(cmd["round"], arrays, num_examples=1 + spec["index"],
                                       client_id=f"{cmd['tag']}-{spec['index']}-{i}")
        print("done", flush=True)


class Clients:
    def __init__(self, n: int, model: str, cpus: str, conns: int, chunk_mib: int):
        self.procs = []
        for i in range(n):
            p = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_ingest_pool", "--worker"], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            p.stdin.write(json.dumps({"index": i, "model": model, "cpus": cpus, "conns": conns,
                                     "chunk_mib": chunk_mib}) + "\n")
            p.stdin.flush()
            self.procs.append(p)
        for p in self.procs:
            assert p.stdout.readline().strip() == "ready"

    def push(self, address: str, rid: int, tag: str, n: int) -> None:
        for p in self.procs:
            p.stdin.write(json.dumps({"address": address, "round": rid, "tag": tag, "n": n}) + "\n")
            p.stdin.flush()
        for p in self.procs:
            line = p.stdout.readline().strip()
            if line != "done":
                raise RuntimeError(f"a client process failed ({line!r})")

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            p.wait(30)


# -- the benchmark --------------------------------------------------------------------------------
def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        return _worker()
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp1m")
    p.add_argument("--processes", type=int, default=8, help="gateway (and null-sink) processes")
    p.add_argument("--clients", type=int, default=16, help="client processes")
    p.add_argument("--conns", type=int, default=4, help="connections per client process")
    p.add_argument("--pushes", type=int, default=None, help="updates per client per sample")
    p.add_argument("--server-cpus", default="", help="e.g. 0-7 (default: not pinned)")
    p.add_argument("--client-cpus", default="", help="e.g. 8-15 (default: not pinned)")
    p.add_argument("--e2e", action="store_true", help="clock to the pullable result (LIFL cases only)")
    p.add_argument("--no-null", action="store_true", help="leave out the null-sink peer")
    p.add_argument("--tuned-null", action="store_true",
                   help="a diagnostic peer: N null sinks with LIFL's malloc policy (malloc_keep_buffers)")
    p.add_argument("--shm-budget-mb", type=int, default=2048)
    p.add_argument("--chunk-mib", type=int, default=2, help="the clients' chunk size")
    p.add_argument("--ab", action="append", default=[], metavar="ROOT",
                   help="one more case (repeatable): LIFL with N processes from another checkout (its C kernel "
                        "built), compared on throughput and the head's CPU per update")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=JSON: one more LIFL server with N processes and these settings, as a case")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    pushes = args.pushes or (4 if args.quick else 16)
    n = args.processes
    arrays = model_arrays(args.model)
    layout = Layout.from_arrays(arrays)
    total = args.clients * pushes
    env = {"LIFL_BENCH_CPUS": args.server_cpus} if args.server_cpus else None
    lifl_cfg = {"shm_budget_mb": args.shm_budget_mb, "reject_nonfinite": True}
    servers = {"lifl1": ServerProc("lifl", env=env, gateway_processes="1", **lifl_cfg),
               f"lifl{n}": ServerProc("lifl", env=env, gateway_processes=str(n), **lifl_cfg)}
    for v in args.variant:
        name, _, conf = v.partition("=")
        servers[name] = ServerProc("lifl", env=env, **{**lifl_cfg, "gateway_processes": str(n), **json.loads(conf)})
    others = {f"ab:{Path(r).name}": r for r in args.ab}   # case -> checkout
    for name, root in others.items():
        servers[name] = ServerProc("lifl", env=env, root=Path(root), **{**lifl_cfg, "gateway_processes": str(n)})
    nulls: dict[str, list[ServerProc]] = {}   # case -> its N processes
    if not (args.no_null or args.e2e):
        for name, keep in [(f"null{n}", False)] + [(f"nullkeep{n}", True)] * args.tuned_null:
            first = ServerProc("null", env=env, reuseport=True, keep_buffers=keep)
            port = int(first.address.rsplit(":", 1)[1])
            nulls[name] = [first] + [ServerProc("null", env=env, reuseport=True, port=port, keep_buffers=keep)
                                     for _ in range(n - 1)]
            servers[name] = first
    clients = Clients(args.clients, args.model, args.client_cpus, args.conns, args.chunk_mib)
    admins = {k: Client(s.address) for k, s in servers.items() if not k.startswith("null")}
    cpu: dict[str, list[TreeCpu]] = {k: [] for k in servers}   # per sample
    seq = iter(range(10**9))

    def lifl_case(name):
        srv, admin = servers[name], admins[name]

        def run():
            rid = admin.open_round(layout=layout, expected=total)
            c0 = tree_cpu(srv.pid)
            t0 = time.perf_counter()
            clients.push(srv.address, rid, f"s{next(seq)}", pushes)
            acked = time.perf_counter() - t0
            admin.pull(rid, wait_s=600)
            dt = time.perf_counter() - t0 if args.e2e else acked
            cpu[name].append(tree_cpu(srv.pid) - c0)
            return dt
        return run

    def null_case(name):
        def run():
            c0 = [tree_cpu(q.pid) for q in nulls[name]]
            t0 = time.perf_counter()
            clients.push(servers[name].address, 0, f"s{next(seq)}", pushes)
            dt = time.perf_counter() - t0
            d = [tree_cpu(q.pid) - c for q, c in zip(nulls[name], c0)]
            cpu[name].append(TreeCpu(head=sum(x.head + x.rest for x in d), runq_wait=sum(x.runq_wait for x in d)))
            return dt
        return run

    cases = [(k, null_case(k) if k.startswith("null") else lifl_case(k)) for k in servers]
    print(f"bench_ingest_pool: {args.model} ({layout.describe()}), {args.clients} client processes x "
          f"{args.conns} connections, {pushes} pushes each per sample, {n} processes, {reps} reps, "
          f"servers on cpus [{args.server_cpus or 'any'}], clients on [{args.client_cpus or 'any'}]", flush=True)
    try:
        s = interleave(cases, reps)
    finally:
        clients.close()
        for c in admins.values():
            c.close()
        for srv in {*servers.values(), *(q for qs in nulls.values() for q in qs)}:
            srv.close()

    gibs = {k: [total * layout.total_size / t / 2**30 for t in v] for k, v in s.items()}
    what = "to the pullable result" if args.e2e else "to the last acknowledgement"
    rep = Report("bench_ingest_pool", f"Ingest with {n} gateway processes, many clients (higher is better)",
                 {"model": f"{args.model}: {layout.describe()}", "client processes": args.clients,
                  "connections per client": args.conns, "pushes per client per sample": pushes,
                  "updates per sample": total, "clock": what, "server cpus": args.server_cpus or "any",
                  "client cpus": args.client_cpus or "any", "cpus": os.cpu_count(), "reps (interleaved)": reps,
                  "LIFL": f"own process, defaults + shm_budget_mb={args.shm_budget_mb}",
                  "null sink": f"{n} processes on one port (SO_REUSEPORT), count bytes"})
    rep.add(f"{n} vs 1 gateway processes", "GiB/s ratio", gibs[f"lifl{n}"], gibs["lifl1"], "GiB/s",
            goal=">= 4", better="higher", threshold=4.0, ours_label=f"LIFL x{n}", peer_label="LIFL x1")
    if f"null{n}" in gibs:
        rep.add(f"{n} gateway vs {n} null-sink processes", "GiB/s ratio", gibs[f"lifl{n}"], gibs[f"null{n}"],
                "GiB/s", goal=">= 0.9", better="higher", threshold=0.9, ours_label=f"LIFL x{n}",
                peer_label=f"null x{n}")
    if f"nullkeep{n}" in gibs:
        rep.add(f"{n} gateway vs {n} null-sink processes with LIFL's malloc policy", "diagnostic: GiB/s ratio",
                gibs[f"lifl{n}"], gibs[f"nullkeep{n}"], "GiB/s", ours_label=f"LIFL x{n}", peer_label=f"null-keep x{n}")
    if args.e2e:
        ups = {k: [total / t for t in v] for k, v in s.items()}
        rep.add(f"{n} vs 1 gateway processes", "updates/s to the pullable model", ups[f"lifl{n}"], ups["lifl1"],
                "updates/s", ours_label=f"LIFL x{n}", peer_label="LIFL x1")
        rep.add(f"{n} vs 1 gateway processes", "round time (s), lower is better", s[f"lifl{n}"], s["lifl1"], "s",
                ours_label=f"LIFL x{n}", peer_label="LIFL x1")
    for k in servers:
        if k not in ("lifl1", f"lifl{n}") and not k.startswith("null"):
            rep.add(f"variant {k}", f"GiB/s ÷ LIFL x{n} defaults", gibs[k], gibs[f"lifl{n}"], "GiB/s",
                    ours_label=k, peer_label=f"LIFL x{n}")
    for name, root in others.items():   # the head decides for every process: its CPU per update bounds the pool
        per = {k: [c.head / total * 1e3 for c in cpu[k][-reps:]] for k in (f"lifl{n}", name)}
        rep.add(f"{n} processes: this tree vs {root}", "head CPU per update (ms), lower is better",
                per[f"lifl{n}"], per[name], "ms", ours_label="this tree", peer_label=name)
    gib = total * layout.total_size / 2**30
    for k, v in cpu.items():   # where the servers' CPU went (from /proc), per sample
        v = v[-reps:]
        m = {f: median([getattr(c, f) for c in v]) for f in ("head", "pool", "functions", "runq_wait")}
        per_gib = median([(c.head + c.rest) / gib for c in v])
        if k.startswith("null"):
            rep.notes.append(f"{k}: CPU-s per sample {m['head']:.2f} ({per_gib:.2f} CPU-s per GiB); "
                             f"threads waited {m['runq_wait']:.2f} s for a CPU")
        else:
            rep.notes.append(f"{k}: CPU-s per sample: head process {m['head']:.2f}, pool gateways {m['pool']:.2f}, "
                             f"functions {m['functions']:.2f} ({per_gib:.2f} CPU-s per GiB); threads waited "
                             f"{m['runq_wait']:.2f} s for a CPU")
        rep.raw[f"cpu|{k}"] = [astuple(c) for c in v]
    rep.print()
    rep.write(args.out)


if __name__ == "__main__":
    main()
