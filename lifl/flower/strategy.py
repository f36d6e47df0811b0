"""A Flower strategy wrapper that hands model aggregation to LIFL (Message API, flwr >= 1.42).

    from flwr.serverapp.strategy import FedAvg
    from lifl.flower import LiflStrategy
    strategy = LiflStrategy(FedAvg(fraction_evaluate=0.0), address="127.0.0.1:50051")
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)

``configure_train`` lets the wrapped strategy sample nodes and build its train
messages, then opens a LIFL round for the current global model's tensor layout
(expected = number of sampled nodes, optional quorum and deadline) and adds the
round reference (``lifl.round``, ``lifl.job``, ``lifl.address``, weighting key,
...) to each message's ConfigRecord. With ``pull_model=True`` the round is opened
with the model itself and the messages carry no ArrayRecord at all: the client
mod pulls the model from LIFL, so the SuperLink moves neither the global model
nor the updates. When that model is the one the previous round returned (LIFL's
result), the round is opened ``from_round`` it: no upload and no copy in LIFL. Without it LIFL never receives the model (it only needs the
layout to fold updates), which saves an upload and a model-sized segment per round.

Clients with :func:`lifl.flower.lifl_mod` stream their update to LIFL and reply
with a receipt. ``aggregate_train`` closes the round on quorum if some clients
failed or never replied (LIFL closes it by itself when all expected updates
arrived), pulls LIFL's exact FedAvg (float64-accumulated, cast back to each
dtype) straight into an ArrayRecord, one tensor at a time, and returns it;
metrics are aggregated by the wrapped strategy's ``train_metrics_aggr_fn`` over
the replies whose update LIFL counted.
A reply that still carries its arrays (a client without the mod) is pushed to
LIFL by the strategy on the client's behalf, so mixed fleets stay exact.

Supported wrapped strategies: :class:`flwr.serverapp.strategy.FedAvg` and
subclasses whose server-side aggregation is the plain weighted mean
(``aggregate_train`` not overridden, e.g. ``FedProx``), and the strategies that
apply a server optimizer to that mean (``FedAvgM``, ``FedAdam``, ``FedYogi``,
``FedAdagrad``): they are handed LIFL's mean as their only reply (the weighted
mean of one reply is itself) and take their server step from it as usual.
Robust aggregation (Krum, median, trimmed mean, ...) needs every update, not
their mean, and is refused unless ``allow_any=True`` (then LIFL's plain FedAvg
is used instead).
Evaluation (``configure_evaluate`` / ``aggregate_evaluate``) and ``summary``
are delegated unchanged.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import grpc
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from ..client import Client, RpcFailure
from ..layout import Layout
from . import config as K
from .mod import arrays_to_numpy, pull_arrays, release_heap

log = logging.getLogger("flwr.lifl")  # propagates to Flower's log handlers

# aggregate_train methods that are "weighted mean, then a server optimizer step on it"
SERVER_STEPS = {cls.aggregate_train for cls in (FedAvgM, FedAdam, FedYogi, FedAdagrad)}


def takes_server_step(strategy: FedAvg) -> bool:
    """True if the strategy moves the model from the weighted mean with a server optimizer."""
    return type(strategy).aggregate_train in SERVER_STEPS


class LiflStrategy(Strategy):
    """Wrap a weighted-mean Flower strategy so that LIFL aggregates the model.

    Parameters
    ----------
    strategy: the wrapped strategy (FedAvg or a subclass that keeps FedAvg's aggregation).
    address: LIFL gateway ``host:port`` the ServerApp uses.
    client_address: address announced to clients (default: ``address``); a node can
        still override it with its node config ``lifl-address``.
    token / root_cert: bearer token and PEM root certificate (bytes) for the ServerApp's calls.
    job: LIFL job name for this run's rounds.
    quorum: rounds close on quorum when some sampled clients fail or never reply; an int
        (clients) or a float in (0, 1] (fraction of the sampled clients); 0 = all sampled.
    deadline_s: LIFL-side round deadline in seconds (0 = none; Flower's own ``timeout``
        then bounds the round and the strategy closes it on quorum).
    pull_model: send train messages without the model; clients pull it from LIFL.
    pull_wait_s: how long ``aggregate_train`` waits for LIFL's result.
    """

    def __init__(self, strategy: FedAvg, address: str, *, client_address: str | None = None,
                 token: str | None = None, root_cert: bytes | None = None, job: str = "default",
                 quorum: int | float = 0, deadline_s: float = 0.0, pull_model: bool = False,
                 pull_wait_s: float = 600.0, allow_any: bool = False):
        if not isinstance(strategy, FedAvg):
            raise TypeError(f"LiflStrategy wraps FedAvg-family strategies, got {type(strategy).__name__}")
        self.server_step = takes_server_step(strategy)
        if not (allow_any or self.server_step or type(strategy).aggregate_train is FedAvg.aggregate_train):
            raise TypeError(
                f"{type(strategy).__name__} overrides aggregate_train, so its result is neither the weighted mean "
                "LIFL computes nor a server optimizer step from it (FedAvgM, FedAdam, FedYogi, FedAdagrad); "
                "pass allow_any=True to use LIFL's FedAvg anyway")
        if isinstance(quorum, float) and not 0.0 <= quorum <= 1.0:
            raise ValueError(f"a fractional quorum must be in [0, 1], got {quorum}")
        self.inner = strategy
        self.address = address
        self.client_address = client_address or address
        self.job, self.quorum, self.deadline_s = job, quorum, deadline_s
        self.pull_model, self.pull_wait_s = pull_model, pull_wait_s
        self._client = Client(address, token=token, root_cert=root_cert)
        self._rounds: dict[int, int] = {}       # flower server_round -> LIFL round id
        self._last: tuple[ArrayRecord, int] | None = None   # the model aggregate_train returned, its LIFL round
        self.last_round_detail: str = ""

    # -- delegation ------------------------------------------------------------------
    def __getattr__(self, name):                # weighted_by_key, arrayrecord_key, ... of the wrapped strategy
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        deadline = f"{self.deadline_s} s" if self.deadline_s else "none"
        log.info("LIFL aggregation at %s (job %r, quorum %s, deadline %s, pull_model %s)",
                 self.address, self.job, self.quorum or "all", deadline, self.pull_model)
        self.inner.summary()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    # -- train -------------------------------------------------------------------------
    def _quorum_for(self, expected: int) -> int:
        q = self.quorum
        if isinstance(q, float):
            return max(1, min(expected, math.ceil(q * expected))) if q > 0 else 0
        return min(int(q), expected)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        model = arrays_to_numpy(arrays)          # read-only views over the ArrayRecord's bytes, no copy
        rid = 0
        # Only the pull option needs LIFL to hold the model (clients fetch it from there); otherwise the
        # round is opened with the tensor layout alone: no model upload, no model-sized segment in LIFL.
        try:
            if self.pull_model and self._last is not None and self._last[0] is arrays:
                # the global model is the result LIFL just computed: open from it, no upload, no copy
                rid = self._open_from(self._last[1], len(messages))
            if self.pull_model and not rid:
                rid = self._client.open_round(model, expected=len(messages),
                                              quorum=self._quorum_for(len(messages)),
                                              deadline_s=self.deadline_s, job=self.job)
            elif not self.pull_model:
                rid = self._client.open_round(layout=Layout.from_arrays(model), expected=len(messages),
                                              quorum=self._quorum_for(len(messages)),
                                              deadline_s=self.deadline_s, job=self.job)
        except RpcFailure as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:
                raise RuntimeError(f"LIFL at {self.address} could not be reached to open the round for server "
                                   f"round {server_round} (is `lifl serve` running there?): {e.message}") from None
            raise RuntimeError(f"LIFL at {self.address} refused to open round for server round {server_round}: "
                               f"{e.code.name}: {e.message}") from None
        del model
        release_heap()
        self._last = None
        self._rounds[server_round] = rid
        log.info("LIFL round %d opened for server round %d (%d clients)", rid, server_round, len(messages))
        akey, ckey = self.inner.arrayrecord_key, self.inner.configrecord_key
        out = []
        for m in messages:
            cfg = ConfigRecord(dict(m.content[ckey]) if ckey in m.content else {})
            cfg.update({K.ROUND: rid, K.JOB: self.job, K.ADDRESS: self.client_address,
                        K.WEIGHT_KEY: self.inner.weighted_by_key, K.ARRAYS_KEY: akey, K.PULL: self.pull_model})
            content = RecordDict({k: v for k, v in m.content.items()
                                  if k != ckey and not (self.pull_model and k == akey)})
            content[ckey] = cfg
            md = m.metadata
            out.append(Message(content=content, dst_node_id=md.dst_node_id, message_type=md.message_type,
                               ttl=md.ttl, group_id=md.group_id or None))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rid = self._rounds.pop(server_round, None)
        if rid is None:
            log.warning("aggregate_train: no LIFL round for server round %d", server_round)
            return None, None
        counted: list[RecordDict] = []
        errors = 0
        for m in replies:
            if m.has_error():
                errors += 1
                log.info("aggregate_train: node %d failed: %s", m.metadata.src_node_id, m.error.reason)
                continue
            content = m.content
            if K.RECEIPT in content.config_records:
                counted.append(content)
            elif content.array_records:          # a client without the mod: push on its behalf
                try:
                    self._push_for(rid, m)
                    counted.append(content)
                except (RpcFailure, ValueError, TypeError) as e:
                    errors += 1
                    log.warning("aggregate_train: update of node %d refused by LIFL: %s", m.metadata.src_node_id, e)
            else:
                errors += 1
                log.warning("aggregate_train: node %d replied with neither a receipt nor arrays",
                            m.metadata.src_node_id)
        log.info("aggregate_train: %d updates in LIFL round %d, %d failures", len(counted), rid, errors)

        arrays = None
        try:
            info = self._client.round_info(rid, job=self.job)
            if info.state == "open":
                # some sampled clients failed or did not answer within Flower's timeout: close on quorum
                try:
                    info = self._client.close_round(rid, job=self.job)
                except RpcFailure as e:      # it closed by itself meanwhile
                    log.debug("close_round(%d): %s", rid, e)
            deadline = time.monotonic() + self.pull_wait_s
            arrays = pull_arrays(self._client, rid, wait_s=self.pull_wait_s, job=self.job)
            release_heap()
            info = self._client.round_info(rid, job=self.job)
            self.last_round_detail = info.detail
            log.info("LIFL round %d: %s (%.3fs left of the pull wait)", rid, self.last_round_detail,
                     deadline - time.monotonic())
        except RpcFailure as e:
            self.last_round_detail = f"{e.code.name}: {e.message}"
            log.warning("LIFL round %d produced no model (%s); keeping the previous global model", rid,
                        self.last_round_detail)
            return None, None

        metrics = self.inner.train_metrics_aggr_fn(counted, self.inner.weighted_by_key) if counted else None
        if self.server_step:
            arrays = self._step_from_mean(server_round, arrays, info.total_weight)
            self._last = None            # the new model is not LIFL's result: the next round uploads it
        else:
            self._last = (arrays, rid)
        return arrays, metrics

    def _step_from_mean(self, server_round: int, mean: ArrayRecord, total_weight: float) -> ArrayRecord | None:
        """The wrapped strategy's server optimizer step, from LIFL's weighted mean given as the only
        reply: FedAvg's mean of a single reply is that reply, so the step sees the mean it would
        have computed itself (in float64, cast back, rather than Flower's float32 sum)."""
        reply = Message(RecordDict({self.inner.arrayrecord_key: mean,
                                    "metrics": MetricRecord({self.inner.weighted_by_key: float(total_weight)})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        arrays, _ = self.inner.aggregate_train(server_round, [reply])
        if arrays is None:
            return None
        return keep_dtypes(arrays, mean)

    def _open_from(self, prev: int, expected: int) -> int:
        """Open a round whose model is LIFL round ``prev``'s result; 0 if LIFL no longer has it."""
        try:
            return self._client.open_round(from_round=prev, expected=expected, quorum=self._quorum_for(expected),
                                           deadline_s=self.deadline_s, job=self.job)
        except RpcFailure as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            log.info("LIFL round %d's result is gone (%s); uploading the model", prev, e.message)
            return 0

    def _push_for(self, rid: int, m: Message) -> None:
        content = m.content
        akey = self.inner.arrayrecord_key
        rec = content.array_records.get(akey) or next(iter(content.array_records.values()))
        weight = None
        for mrec in content.metric_records.values():
            if self.inner.weighted_by_key in mrec:
                weight = float(mrec[self.inner.weighted_by_key])
        if weight is None:
            raise ValueError(f"no weighting metric {self.inner.weighted_by_key!r}")
        self._client.push(rid, arrays_to_numpy(rec), weight, client_id=f"node-{m.metadata.src_node_id}",
                          job=self.job)

    def close(self) -> None:
        self._client.close()


def keep_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``arrays`` with each tensor in ``like``'s dtype. Flower's FedOpt family returns float64 for
    float32 models (its step multiplies by numpy float64 scalars); a LIFL round's layout is fixed
    by its model, so an upcast global model would make every client's float32 update a wrong
    layout in the next round."""
    changed = {k: a for k, a in arrays.items() if k in like and a.dtype != like[k].dtype}
    if not changed:
        return arrays
    log.info("server step returned %s for %d tensors; cast back to the clients' dtypes",
             sorted({a.dtype for a in changed.values()}), len(changed))
    return ArrayRecord({k: Array(a.numpy().astype(like[k].dtype)) if k in changed else a
                        for k, a in arrays.items()})
