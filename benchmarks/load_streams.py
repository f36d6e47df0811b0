"""Many concurrent push streams against one real server on loopback: errors, memory, latency.

    python -m benchmarks.load_streams [--clients 1100] [--procs 2] [--kib 256] [--budget-mb 16] [--quick]

``--clients`` grpc.aio push coroutines, split over ``--procs`` client processes, all start at once
(each process waits for a start time) and push one update each to one round (``expected`` =
clients), so that every stream is open at the same time. The server (its own process) has a small
slot budget: most streams wait for admission — or get RESOURCE_EXHAUSTED with a retry hint, or
grpcio's call limit — and retry as the Python client would (expected, counted as retries, not
errors). Anything else is an unexpected error. Measured: the most streams open at once (client
side) and in flight at the server (``GetRound.in_flight``, polled), push latency p50/p99 (first
attempt to accepted reply), peak server RSS/PSS and /dev/shm bytes (``procsampler``) against the
bound the settings give, and the round's result against float64 FedAvg. Self-stopping: every
coroutine gives up after ``--give-up-s``. Writes bench-out/load_streams.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

from .common import OUT_DIR, ROOT, MiB, ServerProc, machine, parser
from .procsampler import ProcSampler

CLIENT = r"""
import asyncio, json, sys, time
import grpc, numpy as np
from lifl.client import retryable
from lifl.layout import Layout
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk
addr, rid, first, count, n, start_at, give_up = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                                  int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]))
lay = Layout.from_arrays({"w": np.zeros(n, np.float32)})
open_now = peak = 0
async def one(ch, i):
    global open_now, peak
    arr = {"w": np.full(n, float(i % 97), np.float32)}
    buf = bytearray(lay.total_size); lay.pack_into(arr, buf)
    h = pb.PushHeader(round=rid, client_id=f"c{i}", num_examples=float(i % 5 + 1), total_size=lay.total_size)
    lay.to_proto(h.tensors)
    msgs = [pb.PushRequest(header=h).SerializeToString()] + [encode_chunk(bytes(buf[a:a + 65536])) for a in range(0, len(buf), 65536)]
    push = ch.stream_unary("/lifl.v1.Aggregation/Push")
    t0 = time.monotonic(); retries = 0; kinds = {}
    while True:
        open_now += 1; peak = max(peak, open_now)
        try:
            await push(iter(msgs), timeout=give_up)
            return {"ok": True, "latency": time.monotonic() - t0, "retries": retries, "kinds": kinds}
        except grpc.RpcError as e:
            wait = retryable(e)
            code = e.code()
            # grpc.aio may surface a refusal sent before the body was read as INTERNAL (grpc/grpc#36066)
            if wait is None and code == grpc.StatusCode.INTERNAL and "Internal error from Core" in (e.details() or ""):
                wait = 0.2
            if wait is None or time.monotonic() - t0 + wait > give_up:
                return {"ok": False, "error": f"{code.name}: {(e.details() or '')[:160]}", "retries": retries}
            k = code.name + (" (call limit)" if "Concurrent RPC" in (e.details() or "") else "")
            kinds[k] = kinds.get(k, 0) + 1
            retries += 1
            await asyncio.sleep(wait)
        finally:
            open_now -= 1
async def main():
    opts = [("grpc.max_send_message_length", 16 << 20)]
    chans = [grpc.aio.insecure_channel(addr, options=opts + [("grpc.channel_id", k)]) for k in range(8)]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    out = await asyncio.gather(*(one(chans[i % 8], i) for i in range(first, first + count)))
    for c in chans: await c.close()
    print(json.dumps({"results": out, "peak_open": peak}))
asyncio.run(main())
"""


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run(clients: int, procs: int, kib: int, budget_mb: int, give_up_s: float) -> dict:
    from lifl.client import Client
    prefix = f"liflload{uuid.uuid4().hex[:6]}"
    n = kib * 1024 // 4
    cfg = dict(shm_prefix=prefix, shm_budget_mb=budget_mb, admission_timeout_s=2.0, grpc_bdp_probe=False,
               max_concurrent_rpcs=clients + 64, workers=1, leaves=1, planner="static", metrics_port=-1)
    with ServerProc("lifl", **cfg) as srv, Client(srv.address) as c:
        rid = c.open_round({"w": np.zeros(n, np.float32)}, expected=clients)
        in_flight, stop = [0], threading.Event()

        def poll():
            with Client(srv.address) as pc:
                while not stop.is_set():
                    try:
                        in_flight[0] = max(in_flight[0], pc.round_info(rid).in_flight)
                    except Exception:   # noqa: BLE001 - a poll refused under the call limit: try again
                        pass
                    stop.wait(0.05)
        poller = threading.Thread(target=poll, daemon=True)
        with ProcSampler(srv.pid, interval=0.02, shm_prefix=prefix) as sampler:
            base_rss = sampler.now().rss
            start_at = time.time() + 4.0          # every process has imported and connected by then
            per = clients // procs
            ps = [subprocess.Popen([sys.executable, "-c", CLIENT, srv.address, str(rid), str(k * per),
                                    str(per if k < procs - 1 else clients - k * per), str(n), str(start_at),
                                    str(give_up_s)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
                  for k in range(procs)]
            poller.start()
            outs = [json.loads(p.communicate(timeout=give_up_s + 120)[0]) for p in ps]
            t_pushed = time.time() - start_at
            got = c.pull(rid, wait_s=120)
            stop.set()
        poller.join(5)
        info = c.round_info(rid)
    results = [r for o in outs for r in o["results"]]
    lat = [r["latency"] for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r.get("kinds", {}).items():
            kinds[k] = kinds.get(k, 0) + v
    ids = np.arange(clients)
    w, v = (ids % 5 + 1).astype(np.float64), (ids % 97).astype(np.float64)
    ref = float((w * v).sum() / w.sum())
    err = float(np.max(np.abs(got["w"].astype(np.float64) - ref)) / ref)
    bound = budget_mb * MiB
    return {"clients": clients, "procs": procs, "update_kib": kib, "shm_budget_mb": budget_mb,
            "accepted": info.accepted, "state": info.state, "unexpected_errors": len(errors),
            "errors": errors[:10], "retries": kinds,
            "peak_open_streams_client_side": sum(o["peak_open"] for o in outs),
            "peak_in_flight_at_server": in_flight[0],
            "push_latency_s": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat) if lat else None},
            "seconds_to_last_push": t_pushed,
            "server_rss_mib": {"before": base_rss / MiB, "peak": sampler.peak_rss / MiB},
            "server_pss_peak_mib": sampler.peak_pss / MiB,
            "shm_peak_mib": sampler.peak_shm / MiB, "shm_budget_bound_mib": bound / MiB,
            "result_rel_error": err}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1100)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--kib", type=int, default=256)
    p.add_argument("--budget-mb", type=int, default=16)
    p.add_argument("--give-up-s", type=float, default=240.0)
    a = p.parse_args()
    out = run(100 if a.quick else a.clients, a.procs, a.kib, a.budget_mb, a.give_up_s)
    for k, v in out.items():
        print(f"{k:32s} {v}")
    path = a.out or OUT_DIR / "load_streams.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": "load_streams", "machine": machine(), **out}, indent=1))
    print(f"wrote {path}")
    ok = out["unexpected_errors"] == 0 and out["accepted"] == out["clients"] and out["result_rel_error"] < 1e-6
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
