"""The channel between a node's gateway and the head's dispatcher (Ray runtime).

A node gateway receives an update's bytes into its own node's shared memory;
what it must ask the head is small: the round's layout and state, "may this
client start?", "this update is complete in slot S" and "this stream failed".
Those are JSON messages over one unary gRPC method (``lifl.v1.Head/Call``) on
the head's gRPC server, authenticated by a cluster secret the head hands its
node agents. No pickle: JSON in, JSON out; refusals come back as a gRPC status
name and message, which the node gateway returns to its client unchanged.
"""
from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass

import grpc

from .admission import Admission
from .async_jobs import needs_base_version
from .auth import SECRET_KEY, take_rate
from .errors import LiflError
from .layout import Layout
from .pool_channel import answer
from .rounds import Digest, Duplicate, State, job_name

SERVICE, METHOD = "lifl.v1.Head", "Call"


# -- head side -------------------------------------------------------------------------------
class JsonService:
    """JSON in, JSON out over ``lifl.v1.Head/Call``, for callers that present ``secret``: the head's
    service for node gateways and a gateway pool's service for its processes."""

    def __init__(self, secret: str):
        self.secret = secret   # the node gateways' (and their relayed calls')
        self._secret = secret.encode()

    def handle(self, req: dict) -> dict:
        raise NotImplementedError

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(self._call)})

    def _call(self, raw: bytes, context) -> bytes:
        md = dict(context.invocation_metadata())
        if not hmac.compare_digest(md.get(SECRET_KEY, "").encode(), self._secret):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only this cluster's node gateways may call the head")
        try:
            req = json.loads(raw)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad head call: {e}")
        return json.dumps(answer(self.handle, req)).encode()


class HeadService(JsonService):
    """Serves node gateways' calls from the dispatcher. ``node`` is the caller's node name;
    streams in flight per node are remembered so a lost node's clients can be released."""

    def __init__(self, dispatcher, secret: str, asyncs=None, rate=None):
        """``asyncs``: the head's asynchronous jobs (``lifl.async_jobs.AsyncJobs``), which node
        gateways push deltas into. ``rate(key)``: the head's rate limit for a push another gateway
        received (``Gateway.admit_rate``; the caller's key comes with ``begin``/``async_check``)."""
        super().__init__(secret)
        self.dispatcher, self.asyncs, self.rate = dispatcher, asyncs, rate
        self._lock = threading.Lock()
        self.in_flight: dict[str, set[tuple[str, int, str]]] = {}

    def handle(self, req: dict) -> dict:
        d, op = self.dispatcher, req["op"]
        job, rid, node = req["job"], int(req["round"]), req["node"]
        key = (job, rid, req.get("client", ""))
        if op in ("begin", "async_check") and self.rate is not None:
            self.rate(str(req.get("rate_key") or ""))
        if op.startswith("async_"):
            return self._async(op, job, node, req)
        if op in ("round", "begin", "accept"):
            self._not_async(job)
        if op == "round":
            r = d.get(job, rid).round
            return {"id": r.id, "job": r.job, "state": int(r.state), "specs": r.layout.to_wire()}
        if op == "begin":
            d.begin_push(job, rid, req["client"])
            with self._lock:
                self.in_flight.setdefault(node, set()).add(key)
            return {}
        if op in ("accept", "abandon"):
            with self._lock:
                self.in_flight.get(node, set()).discard(key)
            run = d.get(job, rid)
            if op == "abandon":
                d.abandon(run, req["client"])
                return {}
            d.check_open(run)
            digest = Digest.from_dict(req["digest"]) if req.get("digest") else None
            return {"accepted": d.accept(run, req["client"], req["slot"], float(req["weight"]),
                                         node=self.engine_node(node), digest=digest)}
        raise ValueError(f"unknown op {op!r}")

    def _not_async(self, job: str) -> None:
        """A push by round (no base version: a node gateway asks for no job) to an asynchronous job
        is refused as the head refuses it; its buffers' rounds take deltas through ``_async`` only."""
        aj = self.asyncs.get(job_name(job)) if self.asyncs is not None else None
        if aj is not None:
            raise needs_base_version(aj)

    def _async(self, op: str, job: str, node: str, req: dict) -> dict:
        """A node gateway's push into an asynchronous job: the head's ``AsyncJobs`` decides (the
        same checks, the same lock), the delta stays in the node's slot and is folded there."""
        aj = self.asyncs.get(job) if self.asyncs is not None else None
        if aj is None:
            raise LiflError("INVALID_ARGUMENT", f"job {job[:64]!r} has no asynchronous job open; base_version "
                                                "is only for asynchronous jobs (push by round)")
        if op == "async_job":
            return {"name": aj.name, "latest": aj.job.latest, "specs": aj.layout.to_wire()}
        if op == "async_check":
            self.asyncs.check(aj, req["client"], int(req["base"]))
            return {}
        if op == "async_accept":
            t = self.asyncs.accept(aj, req["client"], int(req["base"]), float(req["weight"]), req["slot"], node=self.engine_node(node))
            return {"buffer": t.buffer, "tau": t.tau, "position": t.position}
        raise ValueError(f"unknown op {op!r}")

    def engine_node(self, node: str) -> str:
        """The node the engine routes an update received by ``node``'s gateway to (its own)."""
        return node

    def forget_node(self, node: str) -> list[tuple[str, int, str]]:
        """The node is gone: its streams in flight will never finish (the caller abandons them)."""
        with self._lock:
            return sorted(self.in_flight.pop(node, set()))


# -- node side ---------------------------------------------------------------------------------
@dataclass
class RemoteRound:
    job: str
    id: int
    layout: Layout
    state: State
    detail: str = ""


@dataclass
class RemoteRun:
    round: RemoteRound


@dataclass
class _Latest:
    latest: int


@dataclass
class RemoteAsyncJob:
    """What a node gateway knows of one of the head's asynchronous jobs while a push streams in."""
    name: str
    layout: Layout
    job: _Latest


@dataclass
class RemoteTicket:
    buffer: int
    tau: int
    position: int


class RemoteAsyncJobs:
    """A node gateway's stand-in for the head's ``AsyncJobs``: the same three calls, over the link."""

    def __init__(self, link: "HeadLink"):
        self.link = link

    def get(self, name: str) -> RemoteAsyncJob:
        rep = self.link.call("async_job", name, 0)
        return RemoteAsyncJob(rep["name"], Layout.from_wire(rep["specs"]), _Latest(rep["latest"]))

    def check(self, aj: RemoteAsyncJob, client: str, base: int) -> None:
        self.link.call("async_check", aj.name, 0, client=client, base=base)

    def accept(self, aj: RemoteAsyncJob, client: str, base: int, weight: float, slot: str) -> RemoteTicket:
        rep = self.link.call("async_accept", aj.name, 0, client=client, base=base, weight=weight, slot=slot)
        return RemoteTicket(rep["buffer"], rep["tau"], rep["position"])

    def close(self) -> None:
        """Nothing runs here (the head publishes)."""


class HeadLink(Admission):
    """What a node gateway uses in place of the head's dispatcher: the same ``Admission``."""

    def __init__(self, head_address: str, secret: str, node: str, timeout_s: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, options=(), calls=None):
        """``credentials``: the head serves TLS (``transport.head_link_credentials``); None: plaintext.
        ``calls``: what carries the JSON calls instead of ``lifl.v1.Head/Call`` (a gateway pool's
        process: its parent's ``pool_channel.FrameLink``); the gRPC channel still relays Pull,
        GetRound, Status and Admin."""
        self.node, self.timeout_s, self._frames = node, timeout_s, calls
        self.channel = (grpc.secure_channel(head_address, credentials, options=list(options))
                        if credentials is not None else grpc.insecure_channel(head_address, options=list(options)))
        self._call = self.channel.unary_unary(f"/{SERVICE}/{METHOD}")
        self.secret_metadata = ((SECRET_KEY, secret),)   # also what relayed calls carry (``auth.relayed``)
        self._layouts: dict[tuple[str, int], Layout] = {}
        self._runs: dict[tuple[str, int], RemoteRun] = {}

    def handle(self, req: dict) -> dict:
        """Pass a call on to the head as this node's (a gateway pool's processes on a Ray node)."""
        kw = {k: v for k, v in req.items() if k not in ("op", "job", "round", "node")}
        return self.call(req["op"], req["job"], int(req["round"]), **kw)

    def call(self, op: str, job: str, rid: int, **kw) -> dict:
        req = {"op": op, "job": job, "round": rid, "node": self.node, **kw}
        try:
            if self._frames is not None:
                rep = self._frames(req)
            else:
                raw = self._call(json.dumps(req).encode(), metadata=self.secret_metadata, timeout=self.timeout_s)
                rep = json.loads(raw)
        except (grpc.RpcError, OSError, ValueError) as e:
            why = e.details() if isinstance(e, grpc.RpcError) else str(e)
            raise LiflError("UNAVAILABLE", f"this gateway cannot reach the LIFL head: {why}; "
                                           "retry, or push to another gateway") from None
        if not rep.pop("ok"):
            if rep.get("prior"):
                raise Duplicate(rep["message"], Digest.from_dict(rep["prior"]), int(rep["accepted"]))
            raise LiflError(rep["code"], rep["message"], rep.get("retry_after_s"))
        return rep

    def get(self, job: str, rid: int) -> RemoteRun:
        """A round this gateway has seen is not asked for again (its layout never changes; the
        head's ``begin`` and ``accept`` check its state): one call less per push."""
        known = self._runs.get((job_name(job), rid))
        if known is not None:
            return known
        rep = self.call("round", job, rid)
        layout = self._layouts.get((rep["job"], rid))
        if layout is None:
            layout = self._layouts[(rep["job"], rid)] = Layout.from_wire(rep["specs"])
        run = RemoteRun(RemoteRound(rep["job"], rid, layout, State(rep["state"])))
        if run.round.state == State.OPEN:
            if len(self._runs) >= 64:
                self._runs.clear()
            self._runs[(rep["job"], rid)] = run
        return run

    def begin_push(self, job: str, rid: int, client: str) -> None:
        self.call("begin", job, rid, client=client)

    def check_open(self, run: RemoteRun) -> None:
        """Per chunk: nothing to ask (the head's accept re-checks and refuses a closed round)."""

    def accept(self, run: RemoteRun, client: str, slot: str, weight: float, digest: Digest | None = None) -> int:
        """``digest``: the head records it, so that a resend of the same content, through any
        gateway, succeeds as a duplicate."""
        return self.call("accept", run.round.job, run.round.id, client=client, slot=slot, weight=weight,
                         digest=digest.to_dict() if digest is not None else None)["accepted"]

    def abandon(self, run: RemoteRun, client: str) -> None:
        try:
            self.call("abandon", run.round.job, run.round.id, client=client)
        except LiflError:
            pass  # the head forgets this node's streams if it loses the node

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
        self.channel.close()
