"""A node's gateway (Ray runtime): Push lands in this node's shared memory; the rest goes to the head.

Clients push to the gateway of the node they are closest to, so update bytes
are written once, into the memory of the node whose aggregator functions fold
them. Round state lives at the head (``head_link.HeadLink``); Pull, GetRound
and Status are relayed to the head byte for byte, with the client's
credentials, so a client may use one address for everything; so are the Admin
calls (the gateway pool's processes share the head's port, so a client cannot
choose the head).
"""
from __future__ import annotations

from concurrent import futures

import grpc

from .auth import current_rate_key, relayed
from .config import MiB
from .gateway import Gateway
from .head_link import RemoteAsyncJobs
from .rounds import job_name
from .transport import connection_options

_FORWARD_META = ("authorization",)


def gateway_server(cfg, handlers, interceptors=(), reuseport: bool = False, threads: int = 0) -> grpc.Server:
    """The gRPC server every gateway runs (the head's, a Ray node's, a pool process's): one set of
    limits and options. ``reuseport``: several processes serve one port (the gateway pool);
    ``threads``: more than ``grpc_threads`` (and as many calls at once)."""
    limit = max(cfg.max_chunk_bytes, cfg.header_limit_bytes) + 4096
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(threads, cfg.grpc_threads), thread_name_prefix="lifl-grpc"),
        handlers=handlers, interceptors=list(interceptors),
        # calls in progress (running or queued for a thread); memory per client is set by
        # grpc_bdp_probe, not by this (README, "Memory under many clients")
        maximum_concurrent_rpcs=max(threads, cfg.max_concurrent_rpcs),
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", 16 * MiB),
                 ("grpc.so_reuseport", int(reuseport)),
                 # BDP probing grows each stream's window to megabytes: ~25 % more ingest
                 # for one stream on loopback, but every push waiting for a slot buffers its
                 # window (30 waiting ResNet-18 pushes: ~230 MiB). Off, a waiting push holds
                 # 64 KiB and a stream being read still gets a window of a whole chunk.
                 ("grpc.http2.bdp_probe", int(cfg.grpc_bdp_probe))] + connection_options(cfg))


class NodeGateway(Gateway):
    relays = True   # authenticates here, relays the caller's principal; the head takes the rate limit

    def __init__(self, config, arena, link, metrics):
        super().__init__(config, arena, link, metrics)
        self.link = link
        self.asyncs = RemoteAsyncJobs(link)   # asynchronous jobs live at the head

    def _begin(self, h, enc):
        self.link.call("begin", h.job, h.round, client=h.client_id, rate_key=current_rate_key())
        return None

    def _check_async(self, h, aj, enc):
        self.link.call("async_check", aj.name, 0, client=h.client_id, base=h.base_version,
                       rate_key=current_rate_key())
        return None

    def _async_job(self, h):
        """Only a push with a base version asks the head (a round's push pays no extra call); a push
        without one to an asynchronous job is then refused as a round that does not exist."""
        return self.asyncs.get(job_name(h.job)) if h.HasField("base_version") else None

    def _relay(self, method: str, streaming: bool, client_stream: bool = False):
        path = f"/lifl.v1.{method}"
        ch = self.link.channel
        if client_stream:   # OpenRound: the initial model's chunks pass through as they come
            call = ch.stream_unary(path)

            def forward_in(it, context):
                try:
                    return call(it, metadata=self._forwarded(context))
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details())
            return grpc.stream_unary_rpc_method_handler(forward_in)
        call = (ch.unary_stream if streaming else ch.unary_unary)(path)

        def forward(raw: bytes, context):
            try:
                if streaming:
                    yield from call(raw, metadata=self._forwarded(context))
                else:
                    yield call(raw, metadata=self._forwarded(context))
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())
        if streaming:
            return grpc.unary_stream_rpc_method_handler(forward)
        return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: next(forward(raw, ctx)))

    def _forwarded(self, context) -> tuple:
        """The client's credential, and the principal this gateway authenticated (the head trusts
        it beside the link's secret, and takes the rate limit by its key)."""
        return tuple((k, v) for k, v in context.invocation_metadata() if k in _FORWARD_META) \
            + relayed(self.link.secret_metadata)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        from .v1 import aggregation_pb2 as pb
        agg = {
            "Push": grpc.stream_unary_rpc_method_handler(
                self._wrap(self.push), response_serializer=pb.PushReply.SerializeToString),
            "Pull": self._relay("Aggregation/Pull", True),
            "GetRound": self._relay("Aggregation/GetRound", False),
        }
        admin = {"Status": self._relay("Admin/Status", False),
                 "OpenRound": self._relay("Admin/OpenRound", False, client_stream=True),
                 "CloseRound": self._relay("Admin/CloseRound", False)}
        return [grpc.method_handlers_generic_handler("lifl.v1.Aggregation", agg),
                grpc.method_handlers_generic_handler("lifl.v1.Admin", admin)]
