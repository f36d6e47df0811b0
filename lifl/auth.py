"""Who may call what: authentication, roles, scopes and per-client rate limits, as a gRPC server
interceptor (grpcio's habit: cross-cutting concerns outside the handlers).

Credentials, any of which may be configured (docs/security.md):

- static bearer tokens (``tokens``: clients; ``admin_token``: may also open and close rounds);
- signed, expiring credentials (``token_key``, :mod:`lifl.tokens`) scoped to a job, optionally
  to rounds, with a role (client or operator) and a subject the client must push as;
- client certificates under mutual TLS (``tls_client_ca``): the certificate's common name is
  the client's identity; ``tls_operators`` names the identities that are operators.

With none configured, LIFL's services are open (loopback demos). A call refused here never
reaches its handler: nothing is read, nothing is stored. Scopes that depend on the request
(a push's job, round and client id) are checked by the gateway with :func:`check_scope` on the
:class:`Principal` this interceptor leaves in :func:`current` for the handler.

Methods outside LIFL's two services (the health service, the head link between a cluster's
gateways, which has its own secret) are not this interceptor's business."""
from __future__ import annotations

import contextvars
import dataclasses
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Callable, Collection

import grpc

from .errors import LiflError, quote
from .tokens import CredentialError, Verifier, looks_signed

PROTECTED = ("/lifl.v1.Aggregation/", "/lifl.v1.Admin/")
ADMIN_METHODS = frozenset({"/lifl.v1.Admin/OpenRound", "/lifl.v1.Admin/CloseRound"})
STATUS = "/lifl.v1.Admin/Status"
ANY_JOB = "*"
RELAY_KEY = "x-lifl-relayed-for"     # JSON principal and rate key of a relayed call (with the relay secret)
SECRET_KEY = "x-lifl-cluster-secret"  # nosec B105  # the metadata key's name; the secret is random per server

log = logging.getLogger("lifl.auth")


class Refusal(LiflError):
    """A refused call; ``why`` labels it in the ``lifl_auth_refused`` metric."""

    def __init__(self, code: str, message: str, why: str, retry_after_s: float | None = None):
        super().__init__(code, message, retry_after_s)
        self.why = why


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``subject``: the client id a push must carry (None: any); ``job``: the job
    it may act on (None: any); ``rounds``: the rounds it may push to (None: any)."""
    kind: str                     # "open" (no auth configured), "token", "signed", "cert"
    role: str                     # "client" or "operator"
    subject: str | None = None
    job: str | None = None
    rounds: frozenset[int] | None = None
    scoped: bool = False          # a per-client credential (signed or certificate)

    @property
    def key(self) -> str | None:
        """Its rate-limit bucket: the identity when there is one."""
        return self.subject


@dataclass(frozen=True)
class Policy:
    tokens: frozenset[str] = frozenset()
    admin_token: str = ""
    verifier: Verifier | None = None
    mtls: bool = False
    operators: frozenset[str] = frozenset()

    @property
    def wants_credential(self) -> bool:
        return bool(self.tokens or self.admin_token or self.verifier)

    @property
    def active(self) -> bool:
        return self.wants_credential or self.mtls


def policy_of(config) -> Policy:
    """The policy a server config sets (reads ``token_key`` and ``token_revoked`` now)."""
    verifier = None
    if config.token_key:
        from .tokens import Revocations
        with open(config.token_key, "rb") as f:
            verifier = Verifier(f.read(), Revocations(config.token_revoked, log))
    return Policy(frozenset(config.tokens), config.admin_token, verifier, mtls=bool(config.tls_client_ca),
                  operators=frozenset(config.tls_operators))


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def authenticate(method: str, authorization: str, cert_id: str | None, policy: Policy) -> Principal:
    """The caller of ``method``; raises :class:`Refusal` (UNAUTHENTICATED: no or a bad credential;
    PERMISSION_DENIED: a good one without the right). Pure, except the revocation file's reload."""
    token = authorization[7:] if authorization[:7].lower() == "bearer " else ""
    if not policy.wants_credential:
        p = (Principal("cert", "operator" if cert_id in policy.operators else "client", subject=cert_id,
                       scoped=True) if cert_id else Principal("open", "operator"))
    elif not token:
        raise Refusal("UNAUTHENTICATED", "missing 'authorization: Bearer <token>' metadata", "missing")
    elif policy.admin_token and _same(token, policy.admin_token):
        p = Principal("token", "operator", subject=cert_id)
    elif token in policy.tokens:
        p = Principal("token", "client", subject=cert_id)
    elif policy.verifier is not None and looks_signed(token):
        try:
            c = policy.verifier.verify(token)
        except CredentialError as e:
            raise Refusal(e.code, e.message, e.why) from None
        if cert_id is not None and c.sub != cert_id:
            raise Refusal("PERMISSION_DENIED", f"the credential is for {quote(c.sub)}, the client certificate "
                                               f"for {quote(cert_id)}", "identity")
        p = Principal("signed", c.role, subject=c.sub, job=None if c.job == ANY_JOB else c.job, rounds=c.rounds,
                      scoped=True)
    else:
        raise Refusal("UNAUTHENTICATED", "unknown token", "unknown")
    if method in ADMIN_METHODS and p.role != "operator":
        raise Refusal("PERMISSION_DENIED", "this credential may push and pull, not administer rounds "
                                           "(role client; operators open and close rounds)", "role")
    if method == STATUS and p.scoped and p.role != "operator":
        raise Refusal("PERMISSION_DENIED", "Status lists every job's rounds: operators only", "role")
    return p


def authorize(method: str, authorization: str, tokens: Collection[str], admin_token: str) -> LiflError | None:
    """The static-token rule alone: why a call may not proceed, or None. Pure."""
    if not method.startswith(PROTECTED):
        return None
    try:
        authenticate(method, authorization, None, Policy(frozenset(tokens), admin_token))
    except Refusal as e:
        return e
    return None


def check_scope(p: Principal | None, job: str, round: int | None = None, client_id: str | None = None) -> None:
    """Refuse (PERMISSION_DENIED) a request outside the caller's job, rounds or identity."""
    if p is None:
        return
    if p.job is not None and job != p.job:
        raise Refusal("PERMISSION_DENIED", f"this credential is for job {quote(p.job)}, not {quote(job)}", "job")
    if round is not None and p.rounds is not None and round not in p.rounds:
        raise Refusal("PERMISSION_DENIED", f"this credential may not push to round {round}", "round")
    if client_id is not None and p.subject is not None and client_id != p.subject:
        raise Refusal("PERMISSION_DENIED", f"the client id {quote(client_id)} is not this credential's identity "
                                           f"{quote(p.subject)}: push as yourself", "identity")


_current: contextvars.ContextVar[tuple[Principal, str] | None] = contextvars.ContextVar("lifl_principal",
                                                                                        default=None)


def current() -> Principal | None:
    """The principal of the call the running handler serves (None when nothing checks calls)."""
    c = _current.get()
    return c[0] if c is not None else None


def current_rate_key() -> str | None:
    """The running call's rate-limit key (its identity, else its peer's host), if a Guard noted it."""
    c = _current.get()
    return c[1] if c is not None else None


def relayed(secret_metadata: tuple) -> tuple:
    """Metadata for a call relayed to the head on behalf of the running call: the relay secret
    (``secret_metadata``) and who the caller was, as this gateway authenticated it."""
    c = _current.get()
    if c is None:
        return ()
    p, key = c
    v = {"principal": {**dataclasses.asdict(p), "rounds": None if p.rounds is None else sorted(p.rounds)},
         "key": key}
    return tuple(secret_metadata) + ((RELAY_KEY, json.dumps(v)),)


def cert_identity(context) -> str | None:
    """The verified client certificate's common name, or None (no client certificate)."""
    names = (context.auth_context() or {}).get("x509_common_name")
    return names[0].decode() if names else None


def peer_host(context) -> str:
    """The caller's address without its port (a rate-limit key for callers without identity)."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def take_rate(limiter, key: str) -> None:
    """One call from ``key``'s bucket, or RESOURCE_EXHAUSTED with when to retry."""
    wait = limiter.take(key)
    if wait is not None:
        raise Refusal("RESOURCE_EXHAUSTED", f"rate limit: at most {limiter.rate:g} calls/s (burst "
                      f"{limiter.burst:g}) per client; retry in {wait:.3f} s", "rate", retry_after_s=wait)


class Guard(grpc.ServerInterceptor):
    """Authenticates every call to LIFL's services, checks its role, takes one from the caller's
    rate bucket, and hands the :class:`Principal` (and the caller's rate key) to the handler.
    ``on_refused(method, refusal)`` is told of every refusal (metrics).

    A server's several gateways (a pool's processes, a Ray node's gateway) authenticate their
    callers themselves and relay calls to the head with the principal attached (:func:`relayed`);
    the head trusts it only beside the secret it shares with them (``relay_secret``). The rate
    limit is taken at the head alone — relayed calls by their relayed key, pushes in the head's
    ``begin`` — so that it is one limit, whichever process a client reaches."""

    def __init__(self, policy: Policy, limiter=None,  # nosec B107  # relay_secret "": trust no relayed principal
                 on_refused: Callable[[str, Refusal], None] | None = None, trailers=None,
                 relay_secret: str = "", relaying: bool = False):
        """``trailers(code, message, after_s)``: the retry hints a rate-limited call gets
        (``gateway.retry_trailers``; default: ``retry-after-ms`` alone). ``relaying``: this
        gateway relays to the head, so every call's principal and rate key are noted even when
        nothing here checks them."""
        self.policy, self.limiter, self.on_refused = policy, limiter, on_refused
        self.relay_secret, self.relaying = relay_secret.encode(), relaying
        self.trailers = trailers or (lambda _code, _msg, after_s: (("retry-after-ms", str(int(after_s * 1000))),))

    def _relayed(self, md: dict) -> tuple[Principal, str] | None:
        """A relaying gateway's principal and rate key, if the call carries the relay secret."""
        raw = md.get(RELAY_KEY)
        if raw is None or not self.relay_secret \
                or not hmac.compare_digest(md.get(SECRET_KEY, "").encode(), self.relay_secret):
            return None
        v = json.loads(raw)
        p = v["principal"]
        rounds = p.pop("rounds")
        return Principal(**p, rounds=None if rounds is None else frozenset(rounds)), str(v["key"])

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(PROTECTED) \
                or not (self.policy.active or self.limiter is not None or self.relay_secret or self.relaying):
            return handler
        method = details.method
        md = dict(details.invocation_metadata or ())
        authorization = md.get("authorization", "")

        def admit(context) -> tuple[Principal, str]:
            try:
                relayed = self._relayed(md)
                if relayed is not None:
                    p, key = relayed
                else:
                    p = authenticate(method, authorization, cert_identity(context) if self.policy.mtls else None,
                                     self.policy)
                    key = p.key or peer_host(context)
                if self.limiter is not None:
                    take_rate(self.limiter, key)
                return p, key
            except Refusal as e:
                log.log(logging.DEBUG if e.why == "rate" else logging.INFO, "refused %s from %s: %s %s (%s)",
                        method, context.peer(), e.code, e.message, e.why)
                if self.on_refused is not None:
                    self.on_refused(method, e)
                if e.retry_after_s is not None:
                    context.set_trailing_metadata(self.trailers(grpc.StatusCode[e.code], e.message,
                                                                max(0.001, e.retry_after_s)))
                context.abort(grpc.StatusCode[e.code], e.message)

        return _guarded(handler, admit)


def _guarded(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    """``handler`` with ``admit(context)`` run first; its principal is :func:`current` meanwhile."""
    inner = (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)

    def call(request, context):
        token = _current.set(admit(context))
        try:
            return inner(request, context)
        finally:
            _current.reset(token)

    def stream(request, context):
        _current.set(admit(context))  # the whole response is sent from this thread
        try:
            yield from inner(request, context)
        finally:
            _current.set(None)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        stream if handler.response_streaming else call,
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
