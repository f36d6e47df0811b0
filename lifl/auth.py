"""Bearer-token authorization, as a gRPC server interceptor (grpcio's habit: cross-cutting
concerns outside the handlers).

Client tokens (``tokens``) may push, pull and read rounds and the server's status; the admin
token may also open and close rounds. Methods outside LIFL's two services (the health service,
the head link between a cluster's gateways, which has its own secret) are not this interceptor's
business. A refused call never reaches its handler: nothing is read, nothing is stored."""
from __future__ import annotations

from typing import Callable, Collection, Iterable

import grpc

from .errors import LiflError

PROTECTED = ("/lifl.v1.Aggregation/", "/lifl.v1.Admin/")
ADMIN_METHODS = frozenset({"/lifl.v1.Admin/OpenRound", "/lifl.v1.Admin/CloseRound"})


def authorize(method: str, authorization: str, tokens: Collection[str], admin_token: str) -> LiflError | None:
    """Why a call may not proceed (UNAUTHENTICATED or PERMISSION_DENIED), or None. Pure."""
    if not method.startswith(PROTECTED) or (not tokens and not admin_token):
        return None
    token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
    if not token:
        return LiflError("UNAUTHENTICATED", "missing 'authorization: Bearer <token>' metadata")
    if method in ADMIN_METHODS:
        if admin_token and token == admin_token:
            return None
        if token in tokens:
            return LiflError("PERMISSION_DENIED", "this token may push and pull, not administer rounds")
        return LiflError("UNAUTHENTICATED", "unknown token")
    if token in tokens or (admin_token and token == admin_token):
        return None
    return LiflError("UNAUTHENTICATED", "unknown token")


class TokenAuth(grpc.ServerInterceptor):
    """``on_refused(method, error)`` is told of every refusal (metrics)."""

    def __init__(self, tokens: Iterable[str], admin_token: str,
                 on_refused: Callable[[str, LiflError], None] | None = None):
        self.tokens, self.admin_token, self.on_refused = frozenset(tokens), admin_token, on_refused

    def intercept_service(self, continuation, details):
        md = dict(details.invocation_metadata or ())
        err = authorize(details.method, md.get("authorization", ""), self.tokens, self.admin_token)
        handler = continuation(details)
        if err is None or handler is None:
            return handler
        if self.on_refused is not None:
            self.on_refused(details.method, err)
        return _refusing(handler, err)


def _refusing(handler: grpc.RpcMethodHandler, err: LiflError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with ``err`` at once."""
    def abort(_request, context):
        context.abort(grpc.StatusCode[err.code], err.message)

    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](abort)
