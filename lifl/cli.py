"""The ``lifl`` command line: serve, round open/close/info, job open/info (asynchronous), push, pull,
status, demo, bench, sim.

Models are ``.npz`` files (tensor name -> array) so any tool can produce and
check them. Every failure exits non-zero with one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np

DEFAULT_ADDRESS = os.environ.get("LIFL_ADDRESS", "127.0.0.1:50051")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise SystemExit(f"lifl: cannot read model file {path}: {e}") from None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SystemExit(f"lifl: cannot read {what} {path}: {e.strerror}") from None


def _client(args):
    from .client import Client
    ca, cert, key = (args.ca or os.environ.get("LIFL_CA"), args.cert or os.environ.get("LIFL_CERT"),
                     args.key or os.environ.get("LIFL_KEY"))
    return Client(args.address, token=args.token or os.environ.get("LIFL_TOKEN") or None,
                  root_cert=_read(ca, "CA certificate"), client_cert=_read(cert, "client certificate"),
                  client_key=_read(key, "client key"))


def _print(obj, as_json: bool, human: str) -> None:
    print(json.dumps(obj, indent=None if as_json else 2) if as_json else human)


# -- commands -------------------------------------------------------------------
def cmd_serve(args) -> int:
    from .config import load_config
    from .server import EmbeddedServer

    cfg = load_config(args.config, overrides={
        "host": args.host, "port": args.port, "metrics_port": args.metrics_port, "runtime": args.runtime,
        "leaves": args.leaves, "fan_in": args.fan_in, "workers": args.workers, "shm_budget_mb": args.shm_budget_mb,
        "min_workers": args.min_workers, "keep_alive_s": args.keep_alive, "planner": args.planner,
        "gateway_processes": args.gateway_processes,
        "ray_address": args.ray_address, "placement": args.placement, "insecure": args.insecure or None})
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import malloc_policy
    malloc_policy.apply(cfg)   # this process is ours (an embedded server's host process is not)
    srv = EmbeddedServer(cfg).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = {"address": srv.address, "metrics_port": srv.metrics_port, "pid": os.getpid(),
            "runtime": cfg.runtime, "workers": cfg.workers, "gateways": srv.gateways()}
    print(f"lifl: serving on {srv.address} (runtime {cfg.runtime}, up to {cfg.workers} functions, "
          f"metrics {'on :' + str(srv.metrics_port) if srv.metrics_port >= 0 else 'off'})", flush=True)
    if cfg.runtime == "ray":
        info["ray_address"] = srv.runtime.ray_address
        print(f"lifl: on the Ray cluster at {srv.runtime.ray_address}", flush=True)
        for node, addr in sorted(srv.gateways().items()):
            print(f"lifl: gateway of {node}: {addr}", flush=True)
    if args.ready_file:
        Path(args.ready_file).write_text(json.dumps(info))
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()
        print("lifl: stopped", flush=True)
    return 0


def _round_json(st) -> dict:
    return asdict(st)


def cmd_round_open(args) -> int:
    model = _load_npz(args.model) if args.model else None
    if model is None and not args.from_round:
        raise SystemExit("lifl: round open needs --model FILE.npz or --from-round R")
    with _client(args) as c:
        opt = _optimizer_of(args)
        rid = c.open_round(model, expected=args.expected, quorum=args.quorum, deadline_s=args.deadline,
                           job=args.job, from_round=args.from_round, optimizer=None if opt.is_identity else opt)
        st = c.round_info(rid, job=args.job)
    _print(_round_json(st), args.json, str(rid))
    return 0


def cmd_round_close(args) -> int:
    with _client(args) as c:
        st = c.close_round(args.round, abort=args.abort, job=args.job)
    _print(_round_json(st), args.json, f"round {st.round}: {st.state} ({st.detail})")
    return 0


def cmd_round_info(args) -> int:
    with _client(args) as c:
        st = c.round_info(args.round, job=args.job)
    _print(_round_json(st), args.json,
           f"round {st.round} [{st.job}]: {st.state}, {st.accepted}/{st.expected} updates "
           f"(quorum {st.quorum}), weight {st.total_weight:g}; {st.detail}")
    return 0


def _job_human(st) -> str:
    return (f"job {st.job} (asynchronous): {st.state}, version {st.version}, buffer {st.buffer_fill}/"
            f"{st.buffer_size}, {st.accepted} updates accepted, {st.refused_stale} refused as stale")


def cmd_job_open(args) -> int:
    from .engine.buffered import AsyncSpec, Staleness
    if not args.async_:
        raise SystemExit("lifl: job open opens asynchronous jobs (--async); synchronous jobs use `lifl round open`")
    model = _load_npz(args.model)
    opt = _optimizer_of(args)
    spec = AsyncSpec(buffer_size=args.buffer_size, concurrency=args.concurrency, max_staleness=args.max_staleness,
                     staleness=Staleness(args.staleness, args.staleness_exponent, cutoff=args.staleness_cutoff,
                                         cutoff_weight=args.cutoff_weight),
                     mean_staleness=args.mean_staleness, optimizer=opt, keep_versions=args.keep_versions)
    with _client(args) as c:
        st = c.open_async(model, spec, job=args.job)
    _print(_round_json(st), args.json, _job_human(st))
    return 0


def cmd_job_close(args) -> int:
    with _client(args) as c:
        st = c.close_job(job=args.job)
    _print(_round_json(st), args.json, _job_human(st))
    return 0


def cmd_job_info(args) -> int:
    with _client(args) as c:
        st = c.round_info(0, job=args.job)
    _print(_round_json(st), args.json, _job_human(st) if st.mode == "async" else f"job {st.job}: {st.detail}")
    return 0


def cmd_push(args) -> int:
    arrays = _load_npz(args.update)
    if args.round is None and args.base_version is None:
        raise SystemExit("lifl: push needs --round R (synchronous) or --base-version V (asynchronous job)")
    with _client(args) as c:
        r = c.push(args.round or 0, arrays, args.num_examples, args.client, job=args.job, encoding=args.encoding,
                   base_version=args.base_version)
    if args.base_version is not None:
        print(f"accepted: into the buffer of version {r.version} (staleness {r.staleness}), client "
              f"{r.client_id}, {r.bytes_received} bytes, {r.accepted} in the buffer")
        return 0
    print(f"accepted: round {r.round}, client {r.client_id}, {r.bytes_received} bytes, "
          f"{r.accepted} updates so far")
    return 0


def cmd_pull(args) -> int:
    if (args.round is None) == (args.version is None):
        raise SystemExit("lifl: pull needs one of --round R or --version latest|N (asynchronous job)")
    with _client(args) as c:
        if args.version is not None:
            v = args.version if args.version == "latest" else _version_number(args.version)
            version, arrays = c.pull_version(v, job=args.job)
        else:
            arrays = c.pull(args.round, wait_s=args.wait, initial=args.initial, job=args.job)
    np.savez(args.output, **arrays)
    print(f"wrote {args.output}: {len(arrays)} tensors" + (f" (version {version})" if args.version else ""))
    return 0


def _version_number(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise SystemExit(f"lifl: --version takes 'latest' or a version number >= 0, got {text!r}")
    return v


def cmd_status(args) -> int:
    from google.protobuf.json_format import MessageToDict
    with _client(args) as c:
        rep = c.status()
    if args.json:
        print(json.dumps(MessageToDict(rep, preserving_proto_field_name=True)))
        return 0
    used = rep.shm_used_bytes / 2**20
    print(f"lifl {rep.version}, up {rep.uptime_seconds:.0f}s; hierarchy {rep.hierarchy}; "
          f"shm {used:.1f} MiB held, {rep.slots_in_use} slots in use, budget {rep.shm_budget_bytes / 2**20:.0f} MiB")
    for g in rep.gateways:
        print(f"gateway {g}")
    print(f"{'function':10} {'node':14} {'pid':>7} {'role':8} {'state':6} {'folds':>7} {'updates':>8}")
    for w in rep.workers:
        print(f"{w.id:10} {w.node:14} {w.pid:7} {w.role:8} {w.state:6} {w.folds:7} {w.updates_folded:8}")
    print(f"{'round':>6} {'job':12} {'state':12} {'accepted':>9} {'weight':>10} {'post-arrival':>13}  detail")
    from .rounds import State
    from .v1 import aggregation_pb2 as pb
    for r in rep.rounds:
        if r.mode == pb.JOB_MODE_ASYNC:
            state = State(r.state).name.lower() if r.state else "?"
            print(f"{'async':>6} {r.job[:12]:12} {state:12} {r.accepted:9} {r.total_weight:10g} {'':>13}  "
                  f"version {r.version}, buffer {r.buffer_fill}/{r.buffer_size}, {r.refused_stale} refused stale")
            continue
        state = State(r.state).name.lower() if r.state else "?"
        print(f"{r.round:6} {r.job[:12]:12} {state:12} {f'{r.accepted}/{r.expected}':>9} {r.total_weight:10g} "
              f"{r.post_arrival_seconds * 1000:11.1f}ms  {r.detail}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(clients=args.clients, model=args.model, concurrency=args.concurrency, leaves=args.leaves)


def cmd_bench(args) -> int:
    import runpy
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks").is_dir():
        raise SystemExit("lifl: benchmarks/ is not here; run `lifl bench` from a source checkout")
    sys.path.insert(0, str(root))
    sys.argv = [f"benchmarks.bench_{args.name}"] + args.rest
    runpy.run_module(f"benchmarks.bench_{args.name}", run_name="__main__")
    return 0


def cmd_token_keygen(args) -> int:
    from .tokens import keygen
    keygen(args.key, args.public)
    print(f"wrote {args.key} (private, mode 0600: keep it with the issuer) and {args.public} "
          "(public: the server's token_key)")
    return 0


def cmd_token_issue(args) -> int:
    from .tokens import issue
    rounds = [int(r) for r in args.rounds.split(",") if r] if args.rounds else None
    print(issue(_read(args.key, "signing key"), args.sub, args.job, args.role, args.ttl, rounds))
    return 0


def add_token_parser(sub) -> None:
    t = sub.add_parser("token", help="signed credentials: keygen, issue").add_subparsers(dest="action", required=True)
    k = t.add_parser("keygen", help="write an Ed25519 key pair (PEM)")
    k.add_argument("--key", required=True, help="private key file to create (refuses to overwrite)")
    k.add_argument("--public", required=True, help="public key file (the server's token_key)")
    k.set_defaults(fn=cmd_token_keygen)
    i = t.add_parser("issue", help="print a signed credential")
    i.add_argument("--key", required=True, help="private key file from `lifl token keygen`")
    i.add_argument("--sub", required=True, help="the client's identity (its pushes must carry this client id)")
    i.add_argument("--job", required=True, help="the job it is for ('*': any job)")
    i.add_argument("--role", choices=["client", "operator"], default="client")
    i.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    i.add_argument("--rounds", help="comma-separated round ids it may push to (default: any)")
    i.set_defaults(fn=cmd_token_issue)


def optimizer_args(sp) -> None:
    sp.add_argument("--optimizer", default="sgd", choices=["sgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad"],
                    help="server optimizer applied at finalize, float64 (docs/async.md)")
    sp.add_argument("--server-lr", type=float, default=None, help="server learning rate (default: the optimizer's)")
    sp.add_argument("--momentum", type=float, default=None); sp.add_argument("--beta1", type=float, default=None)
    sp.add_argument("--beta2", type=float, default=None); sp.add_argument("--tau", type=float, default=None)


def _optimizer_of(args):
    from .engine.optimizers import ServerOptimizer
    return ServerOptimizer.of(args.optimizer, lr=args.server_lr, momentum=args.momentum, beta1=args.beta1,
                              beta2=args.beta2, tau=args.tau)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lifl", description="LIFL: serverless aggregation of FL updates")
    sub = p.add_subparsers(dest="command", required=True)

    def remote(sp):
        sp.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port of the server ($LIFL_ADDRESS)")
        sp.add_argument("--token", default=None, help="bearer token or signed credential ($LIFL_TOKEN)")
        sp.add_argument("--ca", help="PEM CA certificate of the server's certificate: connect with TLS ($LIFL_CA)")
        sp.add_argument("--cert", help="PEM client certificate, for mutual TLS ($LIFL_CERT)")
        sp.add_argument("--key", help="PEM key of --cert ($LIFL_KEY)")
        sp.add_argument("--job", default="default")

    s = sub.add_parser("serve", help="run the aggregation service")
    s.add_argument("--config", help="TOML file (top-level keys or a [server] table)")
    s.add_argument("--host"); s.add_argument("--port", type=int); s.add_argument("--metrics-port", type=int)
    s.add_argument("--runtime", choices=["local", "ray"]); s.add_argument("--leaves", type=int)
    s.add_argument("--address", dest="ray_address",
                   help="ray runtime: the Ray cluster to join ('auto', host:port); default starts a local one")
    s.add_argument("--placement", choices=["locality", "random"], help="ray runtime: where functions go")
    s.add_argument("--fan-in", type=int); s.add_argument("--workers", type=int)
    s.add_argument("--shm-budget-mb", type=int)
    s.add_argument("--gateway-processes", help="processes serving the port (SO_REUSEPORT): a number or 'auto'")
    s.add_argument("--min-workers", type=int, help="functions kept warm while idle (default 0: scale to zero)")
    s.add_argument("--keep-alive", type=float, help="seconds an idle function lives before it is stopped")
    s.add_argument("--planner", choices=["elastic", "static"])
    s.add_argument("--ready-file", help="write {address, metrics_port, pid} as JSON here once serving")
    s.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback host (logged as a warning; see docs/security.md)")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("round", help="open, close or inspect a round").add_subparsers(dest="action", required=True)
    o = r.add_parser("open", help="open a round; prints its id")
    remote(o)
    o.add_argument("--model", help="initial model .npz (fixes the tensor specs)")
    o.add_argument("--from-round", type=int, default=0, help="start from this round's result instead")
    o.add_argument("--expected", type=int, required=True)
    o.add_argument("--quorum", type=int, default=0, help="minimum updates to aggregate at the deadline (default: all)")
    o.add_argument("--deadline", type=float, default=0.0, help="seconds until the round closes (0 = none)")
    optimizer_args(o)
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=cmd_round_open)
    c = r.add_parser("close", help="close now (aggregate on quorum) or --abort")
    remote(c); c.add_argument("--round", type=int, required=True); c.add_argument("--abort", action="store_true")
    c.add_argument("--json", action="store_true"); c.set_defaults(fn=cmd_round_close)
    i = r.add_parser("info", help="a round's state")
    remote(i); i.add_argument("--round", type=int, required=True); i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_round_info)

    j = sub.add_parser("job", help="open or inspect an asynchronous (FedBuff) job").add_subparsers(
        dest="action", required=True)
    jo = j.add_parser("open", help="open an asynchronous job at version 0 = --model (docs/async.md)")
    remote(jo)
    jo.add_argument("--async", dest="async_", action="store_true", help="asynchronous buffered aggregation (FedBuff)")
    jo.add_argument("--model", required=True, help="initial model .npz (version 0)")
    jo.add_argument("--buffer-size", type=int, default=10, help="K: updates per published version")
    jo.add_argument("--concurrency", type=int, default=10, help="clients meant to train at once")
    jo.add_argument("--max-staleness", type=int, default=0, help="refuse staler updates (0 = no limit)")
    jo.add_argument("--staleness", choices=["constant", "polynomial"], default="constant")
    jo.add_argument("--staleness-exponent", type=float, default=0.5, help="a in (τ̄+1)^a/(τ+1)^a")
    jo.add_argument("--mean-staleness", type=float, default=None, help="τ̄, weighs 1 (default (concurrency-1)/K)")
    jo.add_argument("--staleness-cutoff", type=int, default=0, help="staler updates weigh --cutoff-weight (0 = none)")
    jo.add_argument("--cutoff-weight", type=float, default=0.01)
    jo.add_argument("--keep-versions", type=int, default=4, help="versions kept pullable")
    optimizer_args(jo)
    jo.add_argument("--json", action="store_true")
    jo.set_defaults(fn=cmd_job_open)
    jc = j.add_parser("close", help="close an asynchronous job (its open buffer is discarded)")
    remote(jc); jc.add_argument("--json", action="store_true"); jc.set_defaults(fn=cmd_job_close)
    ji = j.add_parser("info", help="an asynchronous job's version and buffer")
    remote(ji); ji.add_argument("--json", action="store_true"); ji.set_defaults(fn=cmd_job_info)

    pu = sub.add_parser("push", help="push one update (.npz)")
    remote(pu)
    pu.add_argument("--round", type=int, default=None)
    pu.add_argument("--base-version", type=int, default=None, help="asynchronous job: the version trained on "
                                                                   "(the update is then a delta)")
    pu.add_argument("--client", required=True)
    pu.add_argument("--num-examples", type=float, required=True); pu.add_argument("update")
    pu.add_argument("--encoding", default="raw", choices=("raw", "float16", "bfloat16", "int8"),
                    help="how float32/float64 tensors travel and are held until folded (docs/encodings.md)")
    pu.set_defaults(fn=cmd_push)

    pl = sub.add_parser("pull", help="pull a round's aggregate (or an asynchronous job's version) to .npz")
    remote(pl)
    pl.add_argument("--round", type=int, default=None)
    pl.add_argument("--version", default=None, help="asynchronous job: 'latest' or a kept version number")
    pl.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the result")
    pl.add_argument("--initial", action="store_true", help="the model the round was opened with")
    pl.add_argument("-o", "--output", required=True)
    pl.set_defaults(fn=cmd_pull)

    st = sub.add_parser("status", help="functions, shared memory and recent rounds")
    remote(st); st.add_argument("--json", action="store_true"); st.set_defaults(fn=cmd_status)

    d = sub.add_parser("demo", help="start `lifl serve`, push N ResNet-18 updates over gRPC, check the result")
    d.add_argument("--clients", type=int, default=100); d.add_argument("--model", default="resnet18")
    d.add_argument("--concurrency", type=int, default=4); d.add_argument("--leaves", type=int, default=2)
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="run benchmarks/bench_NAME.py (source checkout)")
    b.add_argument("name"); b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)

    add_token_parser(sub)
    from .sim.cli import add_parser as add_sim_parser  # `lifl sim run|report`: everything lives in lifl.sim
    add_sim_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .client import RpcFailure
    try:
        return args.fn(args) or 0
    except RpcFailure as e:
        print(f"lifl: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError, KeyError) as e:
        print(f"lifl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
