"""Crash loop: SIGKILLs at random moments across the gateway (the ``lifl serve`` process alone),
aggregator functions, and the whole server process tree, in durable mode, while concurrent
clients push and retry whatever was not acknowledged. Checks that no acknowledged update is lost
and that every round's result is the float64 FedAvg of exactly its updates; prints the figures.

Rounds run one after another, each under its own job name (so that an open whose reply was lost
in a crash is found again, not opened twice); a round's ``--clients`` pushes run concurrently on
``--concurrency`` threads, each with a fresh connection per attempt. A killer thread waits a
random 0.2–``--max-gap`` s, kills one target, and restarts the server after a gateway or tree kill.
A client's push counts as *acknowledged* when it got a PushReply; a resend of the same update
after an acknowledgement must succeed as a duplicate (``PushReply.duplicate``; also after a
restart: the journal keeps each update's digest), one with different content must get
ALREADY_EXISTS ("already accepted"). Anything else is retried.

    python -m benchmarks.crash_loop [--kills 24] [--clients 8] [--params 262144] [--seed 1]
"""
from __future__ import annotations

import argparse
import faulthandler
import signal
import json
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from lifl.client import Client, RpcFailure
from lifl.shm import Arena, list_segments

from .killable import KillableServe

#: what a client retries: the server died under the call, or was starting again
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
RESULTS = Path(__file__).resolve().parent / "results"


def model(params: int, seed: int | None) -> dict[str, np.ndarray]:
    """Four tensors (float32 weights, a float64 bias, an int64 counter); seed None: zeros."""
    rng = np.random.default_rng(seed)
    n = params // 2
    draw = (lambda shape, dt: rng.standard_normal(shape).astype(dt)) if seed is not None else \
        (lambda shape, dt: np.zeros(shape, dt))
    return {"w1": draw((n // 64, 64), np.float32), "w2": draw((params - n - 64,), np.float32),
            "b": draw((64,), np.float64), "steps": np.array(0 if seed is None else seed % 1000, np.int64)}


def reference(ups: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {k: sum(w * u[k].astype(np.float64) for u, w in zip(ups, weights)) / total for k in ups[0]}


def max_rel_err(got: dict, ref: dict) -> float:
    worst = 0.0
    for k, r in ref.items():
        g = got[k]
        if g.dtype.kind == "i":
            if not np.array_equal(g, np.rint(r).astype(g.dtype)):
                return float("inf")
            continue
        err = np.abs(g.astype(np.float64) - r) / np.maximum(np.abs(r), 1e-30)
        worst = max(worst, float(err.max()))
    return worst


class Loop:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.rng = random.Random(args.seed)
        self.prefix = f"liflcrash{random.Random().getrandbits(32):08x}"
        self.serve = KillableServe(workdir / "run", durable_dir=str(workdir / "durable"), shm_prefix=self.prefix,
                                   workers=2, leaves=2, fan_in=2, planner="static", keep_rounds=4)
        self.lock = threading.Lock()
        self.up = threading.Event()
        self.stop = threading.Event()
        self.kills: dict[str, int] = {"tree": 0, "gateway": 0, "function": 0}
        self.kill_log: list[tuple[float, str]] = []
        self.restart_s: list[float] = []
        self.acked = self.already = self.retries = self.resend_checks = 0
        self.errors: dict[str, int] = {}
        self.t0 = time.monotonic()

    # -- the killer ------------------------------------------------------------------------------
    def killer(self) -> None:
        kinds = ["tree", "gateway", "function"]
        while not self.stop.is_set() and sum(self.kills.values()) < self.args.kills:
            if self.stop.wait(self.rng.uniform(0.2, self.args.max_gap)):
                return
            kind = self.rng.choice(kinds)
            if kind == "function":
                pids = self._function_pids()
                if not pids:
                    continue
                import os
                import signal
                try:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    continue
            else:
                self.up.clear()
                (self.serve.kill_tree if kind == "tree" else self.serve.kill_gateway)()
                t = time.monotonic()
                self.serve.start()
                self.restart_s.append(time.monotonic() - t)
                self.up.set()
            self.kills[kind] += 1
            self.kill_log.append((round(time.monotonic() - self.t0, 2), kind))

    def _function_pids(self) -> list[int]:
        try:
            with Client(self.serve.address, retry_s=0, timeout_s=2) as c:
                return [w.pid for w in c.status().workers]
        except RpcFailure:
            return []

    # -- clients -------------------------------------------------------------------------------
    def call(self, what: str, fn):
        """Run ``fn(client)`` on a fresh connection until it returns; count what was retried."""
        while True:
            self.up.wait()
            try:
                with Client(self.serve.address, retry_s=0, timeout_s=30) as c:
                    return fn(c)
            except RpcFailure as e:
                if e.code not in RETRYABLE:   # ALREADY_EXISTS is the caller's; anything else is a failure
                    raise
                with self.lock:
                    self.retries += 1
                    key = f"{what}: {e.code.name}"
                    self.errors[key] = self.errors.get(key, 0) + 1
                time.sleep(0.05 + 0.1 * random.random())

    def push(self, job: str, rid: int, client: str, update: dict, weight: float) -> None:
        while True:
            try:
                r = self.call("push", lambda c: c.push(rid, update, weight, client, job=job))
                break
            except RpcFailure as e:
                if "still being received" in e.message:   # our own cut stream, not yet noticed
                    time.sleep(0.1)
                    continue
                raise
        with self.lock:
            if r.duplicate:
                self.already += 1   # logged before the crash cut its acknowledgement: counted once
            else:
                self.acked += 1
        if self.rng.random() < 0.25:   # a resend after the ack is a duplicate; changed content is refused
            again = self.call("resend", lambda c: c.push(rid, update, weight, client, job=job))
            assert again.duplicate, f"{client}: a second push of an acknowledged update was not a duplicate"
            changed = {k: v + 1 for k, v in update.items()}
            try:
                self.call("resend", lambda c: c.push(rid, changed, weight, client, job=job))
                raise AssertionError(f"{client}: different content from an acknowledged client was accepted")
            except RpcFailure as e:
                assert e.code == grpc.StatusCode.ALREADY_EXISTS and "already accepted" in e.message, e
            with self.lock:
                self.resend_checks += 1

    def open(self, job: str, init: dict, expected: int) -> int:
        def attempt(c: Client) -> int:
            for r in c.status().rounds:   # opened before a crash cut the reply
                if r.job == job:
                    return r.round
            return c.open_round(init, expected=expected, job=job)
        return self.call("open", attempt)

    def run_round(self, k: int, pool: ThreadPoolExecutor) -> dict:
        a = self.args
        job = f"loop-{k}"
        init = model(a.params, None)
        rid = self.open(job, init, a.clients)
        ups = {f"dev-{k}-{i}": model(a.params, 1000 * k + i) for i in range(a.clients)}
        weights = {c: float(1 + (hash((k, c)) % 50)) for c in ups}
        list(pool.map(lambda c: self.push(job, rid, c, ups[c], weights[c]), ups))
        got = self.call("pull", lambda c: c.pull(rid, wait_s=30, job=job))
        info = self.call("info", lambda c: c.round_info(rid, job=job))
        names = sorted(ups)
        err = max_rel_err(got, reference([ups[c] for c in names], [weights[c] for c in names]))
        return {"round": rid, "job": job, "accepted": info.accepted, "expected": a.clients,
                "total_weight_ok": info.total_weight == sum(weights.values()), "max_rel_err": err}

    def run(self) -> dict:
        a = self.args
        self.serve.start()
        self.up.set()
        killer = threading.Thread(target=self.killer, name="killer", daemon=True)
        killer.start()
        rounds = []
        try:
            with ThreadPoolExecutor(a.concurrency) as pool:
                k = 0
                while k < a.min_rounds or killer.is_alive():
                    rounds.append(self.run_round(k, pool))
                    r = rounds[-1]
                    print(f"  round {r['round']:3d} ({r['job']}): {r['accepted']}/{r['expected']} updates, "
                          f"max rel err {r['max_rel_err']:.2e}; kills so far {dict(self.kills)}", flush=True)
                    k += 1
        except BaseException:
            self.stop.set()
            killer.join(60)
            self.serve.kill_tree()
            raise
        finally:
            self.stop.set()
            killer.join(60)
        status = self.serve.stop()
        with Arena(1 << 20, prefix=self.prefix):   # reclaims only what a dead pid left: none expected
            leaked = list_segments(self.prefix)
        return {"kills": dict(self.kills), "kills_total": sum(self.kills.values()), "kill_log": self.kill_log,
                "rounds": rounds, "updates_acknowledged": self.acked,
                "updates_logged_but_ack_cut": self.already, "resends_after_ack_checked": self.resend_checks,
                "acknowledged_lost": sum(r["expected"] - r["accepted"] for r in rounds),
                "rounds_exact": sum(r["max_rel_err"] <= 1e-6 and r["total_weight_ok"] for r in rounds),
                "max_rel_err": max(r["max_rel_err"] for r in rounds), "retries": self.retries,
                "retried_errors": self.errors, "restart_s_median": statistics.median(self.restart_s or [0]),
                "restart_s_max": max(self.restart_s or [0]), "final_stop_status": status,
                "server_tracebacks": self.serve.tracebacks(),
                "recovered_rounds_and_updates": self.serve.recovered(),
                "shm_left_after_stop": leaked, "seconds": round(time.monotonic() - self.t0, 1),
                "settings": vars(a)}


def main(argv=None) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # a stuck loop shows where
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--clients", type=int, default=8, help="updates per round")
    p.add_argument("--concurrency", type=int, default=4, help="client threads pushing at once")
    p.add_argument("--params", type=int, default=262144, help="model parameters (float32 mostly)")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--max-gap", type=float, default=2.5, help="most seconds between two kills")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "crash-loop.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = Loop(args, Path(tmp)).run()
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"kills: {res['kills_total']} ({res['kills']}), {len(res['rounds'])} rounds in {res['seconds']} s, "
          f"restart median {res['restart_s_median']:.2f} s (max {res['restart_s_max']:.2f})")
    print(f"restarts recovered {res['recovered_rounds_and_updates'][0]} rounds (open or kept) and re-folded "
          f"{res['recovered_rounds_and_updates'][1]} logged updates from disk")
    print(f"updates acknowledged {res['updates_acknowledged']}, logged but their ack cut by a kill "
          f"{res['updates_logged_but_ack_cut']}, resends after an ack checked (duplicate, changed refused) {res['resends_after_ack_checked']}, "
          f"retries {res['retries']} {res['retried_errors']}")
    print(f"ACKNOWLEDGED UPDATES LOST: {res['acknowledged_lost']}; rounds exact (<= 1e-6 of float64 FedAvg, "
          f"total weight equal): {res['rounds_exact']}/{len(res['rounds'])}, max rel err {res['max_rel_err']:.2e}; "
          f"shared memory left: {len(res['shm_left_after_stop'])}; final stop status {res['final_stop_status']}; "
          f"tracebacks in the server logs: {res['server_tracebacks']}")
    ok = (res["acknowledged_lost"] == 0 and res["rounds_exact"] == len(res["rounds"])
          and not res["shm_left_after_stop"] and res["kills_total"] >= args.kills)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
