"""An independent float64 FedBuff for tests: the paper's algorithm written out, Flower's own
strategies as the server step. Shares no code with lifl."""
from __future__ import annotations

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as flwr_strategy


class FlowerStep:
    """The server step as Flower computes it: its strategy given the buffer's mean as the only result."""

    def __init__(self, kind: str, x0: np.ndarray, **kw):
        p = ndarrays_to_parameters([x0])
        if kind == "sgd":
            self.s = flwr_strategy.FedAvgM(initial_parameters=p, server_learning_rate=kw["lr"])
        elif kind == "fedavgm":
            self.s = flwr_strategy.FedAvgM(initial_parameters=p, server_learning_rate=kw["lr"],
                                           server_momentum=kw["momentum"])
        else:
            cls = dict(fedadam=flwr_strategy.FedAdam, fedyogi=flwr_strategy.FedYogi,
                       fedadagrad=flwr_strategy.FedAdagrad)[kind]
            self.s = cls(initial_parameters=p, eta=kw["lr"])
        self.t = 0

    def __call__(self, x: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        self.t += 1
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([x + mean_delta]), 1, {})
        params, _ = self.s.aggregate_fit(self.t, [(None, res)], [])
        return parameters_to_ndarrays(params)[0]


class Reference:
    """FedBuff written straight from the paper (plus example weights), independent of lifl."""

    def __init__(self, x0, K, C, kind, a, cutoff, cutoff_w, max_st, server_step):
        self.versions, self.buf = [x0.copy()], []
        self.K, self.C, self.kind, self.a, self.cutoff, self.cutoff_w, self.max_st = K, C, kind, a, cutoff, cutoff_w, max_st
        self.server_step = server_step

    def push(self, client, base, w, delta) -> str:
        latest = len(self.versions) - 1
        if base > latest:
            return "OUT_OF_RANGE"
        tau = latest - base
        if self.max_st and tau > self.max_st:
            return "FAILED_PRECONDITION"
        if any(c == client for c, *_ in self.buf):
            return "ALREADY_EXISTS"
        if self.cutoff and tau > self.cutoff:
            s = self.cutoff_w
        elif self.kind == "constant":
            s = 1.0
        else:
            mean_tau = (self.C - 1) / self.K
            s = (1 + mean_tau) ** self.a / (1 + tau) ** self.a
        self.buf.append((client, w, s, delta))
        if len(self.buf) == self.K:
            mean = sum(w * s * d for _, w, s, d in self.buf) / sum(w for _, w, _, _ in self.buf)
            self.versions.append(self.server_step(self.versions[-1], mean))
            self.buf = []
        return "OK"
