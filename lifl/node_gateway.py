"""A node's gateway (Ray runtime): Push lands in this node's shared memory; the rest goes to the head.

Clients push to the gateway of the node they are closest to, so update bytes
are written once, into the memory of the node whose aggregator functions fold
them. Round state lives at the head (``head_link.HeadLink``); Pull, GetRound
and Status are relayed to the head byte for byte, with the client's
credentials, so a client may use one address for everything. Admin calls go
to the head's own address.
"""
from __future__ import annotations

import grpc

from .gateway import Gateway
from .head_link import RemoteAsyncJobs
from .rounds import job_name

_FORWARD_META = ("authorization",)


class NodeGateway(Gateway):
    def __init__(self, config, arena, link, metrics):
        super().__init__(config, arena, link, metrics)
        self.link = link
        self.asyncs = RemoteAsyncJobs(link)   # asynchronous jobs live at the head

    def _async_job(self, h):
        """Only a push with a base version asks the head (a round's push pays no extra call); a push
        without one to an asynchronous job is then refused as a round that does not exist."""
        return self.asyncs.get(job_name(h.job)) if h.HasField("base_version") else None

    def _relay(self, method: str, streaming: bool):
        path = f"/lifl.v1.{method}"
        call = (self.link.channel.unary_stream if streaming else self.link.channel.unary_unary)(path)

        def forward(raw: bytes, context):
            md = tuple((k, v) for k, v in context.invocation_metadata() if k in _FORWARD_META)
            try:
                if streaming:
                    yield from call(raw, metadata=md)
                else:
                    yield call(raw, metadata=md)
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())
        if streaming:
            return grpc.unary_stream_rpc_method_handler(forward)
        return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: next(forward(raw, ctx)))

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        from .v1 import aggregation_pb2 as pb
        agg = {
            "Push": grpc.stream_unary_rpc_method_handler(
                self._wrap(self.push), response_serializer=pb.PushReply.SerializeToString),
            "Pull": self._relay("Aggregation/Pull", True),
            "GetRound": self._relay("Aggregation/GetRound", False),
        }
        return [grpc.method_handlers_generic_handler("lifl.v1.Aggregation", agg),
                grpc.method_handlers_generic_handler("lifl.v1.Admin", {"Status": self._relay("Admin/Status", False)})]
