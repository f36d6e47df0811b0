"""Server memory with many clients pushing at once: the call limit (``max_concurrent_rpcs``) against
none (the behaviour before it existed), interleaved, fresh server per repetition.

N clients (threads in ``--procs`` client processes) push a 1 MiB update each, all at once, to a
server with a small slot budget (``--budget-mb``), so most pushes wait: for admission (they hold a
stream whose window gRPC buffers) or for the call limit (refused, retried by the client). A thread
here samples the server's process tree (Σ RSS, Σ PSS, its /dev/shm bytes). Printed: peak Σ RSS with
the limit ÷ without, and round time beside it.

    python -m benchmarks.bench_many_clients_memory [--clients 1024] [--reps 5] [--quick]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

from .common import ROOT, MiB, Report, ServerProc, interleave, parser
from .procsampler import ProcSampler

CLIENT = r"""
import json, sys, threading, numpy as np
from lifl.client import Client
addr, rid, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
upd = {"w": np.ones(MIB // 4, np.float32)}
errs = []
def one(i):
    try:
        with Client(addr, retry_s=300) as c:
            c.push(rid, upd, 1.0, f"c{i}")
    except Exception as e:
        errs.append(repr(e)[:200])
ts = [threading.Thread(target=one, args=(i,)) for i in range(first, first + count)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(errs[:3]))
""".replace("MIB", str(MiB))


def rep(n: int, procs: int, budget_mb: int, limit: int, bdp: bool = True) -> dict:
    prefix = f"liflmem{uuid.uuid4().hex[:6]}"
    with ServerProc("lifl", shm_prefix=prefix, shm_budget_mb=budget_mb, max_concurrent_rpcs=limit,
                    grpc_bdp_probe=bdp, admission_timeout_s=300) as srv:
        from lifl.client import Client
        import numpy as np
        with Client(srv.address) as c:
            rid = c.open_round({"w": np.ones(MiB // 4, np.float32)}, expected=n)
            with ProcSampler(srv.pid, interval=0.02, shm_prefix=prefix) as sampler:
                t0 = time.perf_counter()
                per = n // procs
                ps = [subprocess.Popen([sys.executable, "-c", CLIENT, srv.address, str(rid), str(k * per),
                                        str(per if k < procs - 1 else n - k * per)], cwd=ROOT,
                                       stdout=subprocess.PIPE, text=True) for k in range(procs)]
                errs = [json.loads(p.communicate()[0] or "[]") for p in ps]
                c.pull(rid, wait_s=300)
            secs = time.perf_counter() - t0
    if any(errs):
        raise RuntimeError(f"pushes failed: {errs}")
    return {"peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "base_rss": sampler.samples[0].rss,
            "peak_shm": sampler.peak_shm, "seconds": secs}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1024)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--budget-mb", type=int, default=20)
    p.add_argument("--limit", type=int, default=64, help="max_concurrent_rpcs of the bounded server")
    p.add_argument("--bdp", choices=("on", "off"), default="on", help="grpc_bdp_probe of the bounded server")
    a = p.parse_args()
    n, reps = (256, 2) if a.quick else (a.clients, a.reps or 5)
    out = interleave([("bounded", lambda: rep(n, a.procs, a.budget_mb, a.limit, a.bdp == "on")),
                      ("unbounded", lambda: rep(n, a.procs, a.budget_mb, 1_000_000))], reps, warmup=0)
    r = Report("many_clients_memory", f"{n} clients pushing 1 MiB at once, slot budget {a.budget_mb} MiB",
               {"clients": n, "client_procs": a.procs, "budget_mb": a.budget_mb, "limit": a.limit,
                "bounded side's grpc_bdp_probe": a.bdp, "peer": "no call limit, grpc_bdp_probe on", "reps": reps})
    b, u = out["bounded"], out["unbounded"]
    r.add("peak", "server Σ RSS", [x["peak_rss"] for x in b], [x["peak_rss"] for x in u], "MiB", scale=1 / MiB,
          ours_label=f"limit {a.limit}", peer_label="no limit", goal="< 1", better="lower", threshold=1.0)
    r.add("peak", "server Σ PSS", [x["peak_pss"] for x in b], [x["peak_pss"] for x in u], "MiB", scale=1 / MiB,
          ours_label=f"limit {a.limit}", peer_label="no limit")
    r.add("round", "wall time", [x["seconds"] for x in b], [x["seconds"] for x in u], "s",
          ours_label=f"limit {a.limit}", peer_label="no limit")
    r.raw["reps"] = out
    r.print()
    r.write(a.out)


if __name__ == "__main__":
    main()
