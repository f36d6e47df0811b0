"""The contract's asynchronous-job and server-optimizer messages <-> the engine's typed specs.

Proto3 zeros mean "default" here (``buffer_size = 0`` is K = 10, ``keep_versions = 0`` is 4,
an empty optimizer kind is plain FedAvg); fields that may legitimately be 0 are ``optional``
so that absence stays distinguishable. Validation is the specs' own (INVALID_ARGUMENT).
"""
from __future__ import annotations

from .engine.buffered import AsyncSpec, Staleness
from .engine.optimizers import ServerOptimizer
from .v1 import aggregation_pb2 as pb

_OPT_FIELDS = ("lr", "momentum", "beta1", "beta2", "tau")
_DEFAULT = AsyncSpec()


def optimizer_from_proto(msg: pb.ServerOptimizer) -> ServerOptimizer:
    """The optimizer a message names, Flower's defaults for what it leaves unset."""
    given = {k: getattr(msg, k) for k in _OPT_FIELDS if msg.HasField(k)}
    return ServerOptimizer.of(msg.kind or "sgd", **given)


def optimizer_to_proto(opt: ServerOptimizer, msg: pb.ServerOptimizer) -> None:
    msg.kind = opt.kind
    for k in _OPT_FIELDS:
        setattr(msg, k, getattr(opt, k))


def spec_from_proto(msg: pb.AsyncOptions, opt: pb.ServerOptimizer | None = None) -> AsyncSpec:
    """An asynchronous job's FedBuff settings, validated."""
    stal = Staleness(kind=msg.staleness or "constant", exponent=msg.staleness_exponent,
                     cutoff=msg.staleness_cutoff, cutoff_weight=msg.cutoff_weight)
    spec = AsyncSpec(buffer_size=msg.buffer_size or _DEFAULT.buffer_size,
                     concurrency=msg.concurrency or _DEFAULT.concurrency,
                     max_staleness=msg.max_staleness, staleness=stal,
                     mean_staleness=msg.mean_staleness if msg.HasField("mean_staleness") else None,
                     optimizer=optimizer_from_proto(opt) if opt is not None else ServerOptimizer(),
                     keep_versions=msg.keep_versions or _DEFAULT.keep_versions)
    return spec.validate()


def spec_to_proto(spec: AsyncSpec, msg: pb.AsyncOptions, opt: pb.ServerOptimizer) -> None:
    s = spec.staleness
    msg.buffer_size, msg.concurrency, msg.max_staleness = spec.buffer_size, spec.concurrency, spec.max_staleness
    msg.staleness, msg.staleness_exponent = s.kind, s.exponent
    msg.staleness_cutoff, msg.cutoff_weight = s.cutoff, s.cutoff_weight
    msg.keep_versions = spec.keep_versions
    if spec.mean_staleness is not None:
        msg.mean_staleness = spec.mean_staleness
    optimizer_to_proto(spec.optimizer, opt)

