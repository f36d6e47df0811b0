"""A long fuzz run against a real LIFL server in its own process (the bounded version is tests/test_fuzz.py).

    python -m benchmarks.fuzz_server [--requests 12000] [--parser 5000] [--valid 24] [--quick]

Hypothesis generates hostile requests for every method (protobuf messages with garbage
fields, wrong types, absurd shapes and weights, unbounded strings, odd encodings, short/long
streams, and raw bytes that are no message at all); each is sent over real gRPC through
generic (untyped) calls and its status counted. Interleaved with the fuzz, ``--valid`` real
clients push real updates to a round of their own job, whose result must be exactly the
float64 FedAvg of those updates. Then ``--parser`` inputs go to the hand-written chunk parser
(``lifl.wire.chunk_payload``) directly, each checked against protobuf's own parse. Prints the
tally per method, the requests that got INTERNAL or UNKNOWN (there must be none), whether the
server survived, the interleaved round's error, and the shared memory held at the end. Writes
bench-out/fuzz_server.json.
"""
from __future__ import annotations

import collections
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import json

from benchmarks.common import OUT_DIR, ServerProc, machine, parser
from benchmarks.procsampler import shm_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fuzzing import METHODS, NEVER, call, requests_for  # noqa: E402  (the tests' strategies)
from support import assert_matches, fedavg64, perturb, small_model  # noqa: E402
from lifl.client import Client  # noqa: E402
from lifl.errors import LiflError  # noqa: E402
from lifl.v1 import aggregation_pb2 as pb  # noqa: E402
from lifl.wire import _varint, chunk_payload, encode_chunk  # noqa: E402

VALID_JOB = "fuzz-interleaved"   # a job name the fuzzer's strings cannot hit: its round stays the clients'


class Interleaved:
    """Real clients pushing real updates to their own round, one every ``every`` fuzz requests."""

    def __init__(self, address: str, n: int, every: int):
        self.c, self.n, self.every, self.sent, self.count = Client(address), n, max(1, every), [], 0
        self.rid = self.c.open_round(small_model(), expected=n, job=VALID_JOB)

    def tick(self) -> None:
        self.count += 1
        if self.count % self.every == 0 and len(self.sent) < self.n:
            self.push_one()

    def push_one(self) -> None:
        i = len(self.sent)
        u = perturb(small_model(), 1000 + i)
        self.c.push(self.rid, u, i + 1, f"valid-{i}", job=VALID_JOB)
        self.sent.append(u)

    def finish(self) -> dict:
        while len(self.sent) < self.n:
            self.push_one()
        got = self.c.pull(self.rid, wait_s=60, job=VALID_JOB)
        ref = fedavg64(self.sent, [float(i + 1) for i in range(self.n)])
        try:    # the tests' check: each dtype within its rounding of the float64 FedAvg, ints/bools exact
            assert_matches(got, ref)
            mismatch = ""
        except AssertionError as e:
            mismatch = str(e)
        err = max(float(np.max(np.abs(got[k].astype(np.float64) - ref[k]) / np.maximum(np.abs(ref[k]), 1e-30)))
                  for k in ref if got[k].dtype == np.float32)
        info = self.c.round_info(self.rid, job=VALID_JOB)
        self.c.close()
        return {"updates": self.n, "state": info.state, "accepted": info.accepted,
                "float32_max_rel_error": err, "mismatch": mismatch,
                "exact": info.state == "done" and info.accepted == self.n and not mismatch}


@st.composite
def chunk_like(draw):
    """Bytes near a chunk message: the right tag with wrong, overlong or truncated varints and
    lengths, other tags, valid chunks with trailing bytes, and plain noise."""
    payload = draw(st.binary(max_size=48))
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return encode_chunk(payload)
    if kind == 1:
        return encode_chunk(payload) + draw(st.binary(min_size=1, max_size=8))
    if kind == 2:
        return encode_chunk(payload)[:draw(st.integers(0, len(payload) + 1))]
    if kind == 3:
        return b"\x12" + _varint(draw(st.integers(0, 2**70))) + payload
    if kind == 4:
        return b"\x12" + b"\x80" * draw(st.integers(1, 14)) + payload   # a varint that never ends
    if kind == 5:
        return bytes([draw(st.integers(0, 255))]) + _varint(len(payload)) + payload
    return draw(st.binary(max_size=64))


def fuzz_parser(n: int) -> dict:
    """The hand-written chunk parser, directly: each input gives a view equal to protobuf's
    ``chunk`` field, or INVALID_ARGUMENT; anything else is a finding."""
    counts: collections.Counter = collections.Counter()
    bad: list[str] = []

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(chunk_like())
    def one(raw):
        try:
            view = chunk_payload(raw, pb.PushRequest, "update")
        except LiflError as e:
            counts[e.code] += 1
            if e.code != "INVALID_ARGUMENT":
                bad.append(f"{raw!r}: {e.code}")
            return
        except Exception as e:      # noqa: BLE001 - a finding, reported
            counts[type(e).__name__] += 1
            bad.append(f"{raw!r}: {e!r}")
            return
        counts["view"] += 1
        msg = pb.PushRequest.FromString(raw)
        if msg.WhichOneof("kind") != "chunk" or bytes(view) != msg.chunk:
            bad.append(f"{raw!r}: view {bytes(view)!r} differs from protobuf's parse")

    one()
    return {"inputs": sum(counts.values()), "outcomes": dict(counts), "findings": bad[:20]}


def run(requests: int, parser_inputs: int = 5000, valid: int = 24) -> dict:
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
        good = Interleaved(srv.address, valid, per * len(METHODS) // (valid + 1))
        for path in sorted(METHODS):
            counts = tally.setdefault(path, collections.Counter())

            @settings(max_examples=per, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(requests_for(path))
            def one(request):
                code, msg = call(ch, path, request, timeout=2.0)
                counts[code.name] += 1
                good.tick()
                if code in NEVER:
                    bad.append({"method": path, "code": code.name, "message": msg[:300],
                                "request": repr(request)[:300]})

            one()
            print(f"{path:32s} {dict(counts)}", flush=True)
        interleaved = good.finish()
        alive = srv.proc.poll() is None
        held = shm_bytes(prefix)
    leaked = shm_bytes(prefix)
    seconds = time.perf_counter() - t0
    parser = fuzz_parser(parser_inputs)
    statuses = collections.Counter()
    for v in tally.values():
        statuses.update(v)
    out = {"requests": sum(sum(c.values()) for c in tally.values()), "seconds": seconds,
           "tally": {k: dict(v) for k, v in tally.items()}, "statuses": dict(statuses),
           "internal_or_unknown": bad, "server_survived": alive, "interleaved_round": interleaved,
           "chunk_parser": parser, "shm_bytes_held_at_end": held, "shm_bytes_after_stop": leaked}
    print(f"\n{out['requests']} gRPC requests in {seconds:.0f} s; statuses {dict(statuses)}")
    print(f"INTERNAL/UNKNOWN: {len(bad)}; server survived: {alive}; shared memory held at the end {held} bytes "
          f"(the open fuzz round's accumulators), after stop {leaked}")
    print(f"interleaved round: {interleaved}")
    print(f"chunk parser: {parser['inputs']} inputs, {parser['outcomes']}, findings {len(parser['findings'])}")
    for b in bad[:20] + parser["findings"]:
        print("  ", b)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=12000)
    p.add_argument("--parser", type=int, default=5000, help="inputs for the chunk parser, directly")
    p.add_argument("--valid", type=int, default=24, help="valid updates pushed interleaved with the fuzz")
    a = p.parse_args()
    out = run(600 if a.quick else a.requests, 300 if a.quick else a.parser, 6 if a.quick else a.valid)
    path = a.out or OUT_DIR / "fuzz_server.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": "fuzz_server", "machine": machine(), **out}, indent=1))
    print(f"wrote {path}")
    sys.exit(1 if out["internal_or_unknown"] or not out["server_survived"] or out["shm_bytes_after_stop"]
             or not out["interleaved_round"]["exact"] or out["chunk_parser"]["findings"] else 0)


if __name__ == "__main__":
    main()
