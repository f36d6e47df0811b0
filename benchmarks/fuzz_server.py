"""A long fuzz run against a real LIFL server in its own process (the bounded version is tests/test_fuzz.py).

    python -m benchmarks.fuzz_server [--requests 12000] [--quick]

Hypothesis generates hostile requests for every method (garbage bytes, wrong types, absurd
shapes and weights, unbounded strings, odd encodings, short/long streams); each is sent over
real gRPC and its status counted. Prints the tally per method, the requests that got INTERNAL
or UNKNOWN (there must be none), whether the server survived, and the shared memory it held
at the end. Writes bench-out/fuzz_server.json.
"""
from __future__ import annotations

import collections
import sys
import time
import uuid
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, settings

import json

from benchmarks.common import OUT_DIR, ServerProc, machine, parser
from benchmarks.procsampler import shm_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fuzzing import METHODS, NEVER, call, requests_for  # noqa: E402  (the tests' strategies)
from support import small_model  # noqa: E402
from lifl.client import Client  # noqa: E402


def run(requests: int) -> dict:
    prefix = f"liflfuzz{uuid.uuid4().hex[:6]}"
    per = max(1, requests // len(METHODS))
    tally: dict[str, collections.Counter] = {}
    bad: list[dict] = []
    t0 = time.perf_counter()
    with ServerProc("lifl", shm_prefix=prefix, workers=1, leaves=1, planner="static", shm_budget_mb=64,
                    max_model_mb=4, admission_timeout_s=0.2) as srv, grpc.insecure_channel(srv.address) as ch:
        with Client(srv.address) as c:      # real rounds (ids 1 and 2) for the fuzzer's small round ids to hit
            c.open_round(small_model(), expected=3)
            done = c.open_round(small_model(), expected=1)
            c.push(done, small_model(), 1, "a")
        for path in sorted(METHODS):
            counts = tally.setdefault(path, collections.Counter())

            @settings(max_examples=per, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(requests_for(path))
            def one(request):
                code, msg = call(ch, path, request, timeout=2.0)
                counts[code.name] += 1
                if code in NEVER:
                    bad.append({"method": path, "code": code.name, "message": msg[:300],
                                "request": repr(request)[:300]})

            one()
            print(f"{path:32s} {dict(counts)}", flush=True)
        alive = srv.proc.poll() is None
        held = shm_bytes(prefix)
    leaked = shm_bytes(prefix)
    out = {"requests": sum(sum(c.values()) for c in tally.values()), "seconds": time.perf_counter() - t0,
           "tally": {k: dict(v) for k, v in tally.items()}, "internal_or_unknown": bad,
           "server_survived": alive, "shm_bytes_held_at_end": held, "shm_bytes_after_stop": leaked}
    print(f"\n{out['requests']} requests in {out['seconds']:.0f} s; INTERNAL/UNKNOWN: {len(bad)}; "
          f"server survived: {alive}; shared memory held at the end {held} bytes, after stop {leaked}")
    for b in bad[:20]:
        print("  ", b)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=12000)
    a = p.parse_args()
    out = run(600 if a.quick else a.requests)
    path = a.out or OUT_DIR / "fuzz_server.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": "fuzz_server", "machine": machine(), **out}, indent=1))
    print(f"wrote {path}")
    sys.exit(1 if out["internal_or_unknown"] or not out["server_survived"] or out["shm_bytes_after_stop"] else 0)


if __name__ == "__main__":
    main()
