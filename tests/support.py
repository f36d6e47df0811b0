"""Test helpers shared by the platform's tests: an independent float64 FedAvg and models."""
from __future__ import annotations

import numpy as np


def fedavg64(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Independent reference: float64 numpy FedAvg (integers rounded half-to-even, bools majority)."""
    total = float(np.sum(weights))
    out = {}
    for k in updates[0]:
        acc = np.zeros(np.shape(updates[0][k]), np.float64)
        for u, w in zip(updates, weights):
            acc += w * np.asarray(u[k]).astype(np.float64)
        out[k] = acc / total
    return out


#: Tolerance per output dtype: float32/float64 results must be within 1e-6 relative of the float64
#: mean; float16/bfloat16 cannot represent that, so they must be within one unit in the last
#: place of their own precision (ties between two neighbours can go either way).
_RTOL = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
_ATOL = {"float16": 2.0**-24, "bfloat16": 1e-38}


def assert_matches(result: dict[str, np.ndarray], ref: dict[str, np.ndarray], rtol: float = 1e-6) -> None:
    assert list(result) == list(ref)
    for k, r in ref.items():
        got = result[k]
        name = str(got.dtype)
        if got.dtype.kind == "f" or name == "bfloat16":
            g = got.astype(np.float64)
            tol = _RTOL.get(name, rtol) * np.abs(r) + _ATOL.get(name, 1e-300)
            err = np.abs(g - r)
            assert (err <= tol).all(), f"{k}: max rel err {np.max(err / np.maximum(np.abs(r), 1e-300)):.3g}"
        elif got.dtype == np.bool_:
            assert np.array_equal(got, r > 0.5), k
        else:
            info = np.iinfo(got.dtype)
            assert np.array_equal(got, np.clip(np.rint(r), info.min, info.max).astype(got.dtype)), k


class FlowerStep:
    """Flower's own server-optimizer strategy (flwr.server.strategy FedAvgM/FedAdam/FedYogi) as an
    independent reference: ``round(rnd, clients)`` is what its ``aggregate_fit`` makes of
    ``[(model dict, weight), ...]`` in round ``rnd`` (its state carries over rounds)."""

    def __init__(self, kind: str, initial: dict[str, np.ndarray], **kw):
        from flwr.common import ndarrays_to_parameters
        from flwr.server import strategy as fs
        p = ndarrays_to_parameters(list(initial.values()))
        if kind == "fedavgm":
            self.strategy = fs.FedAvgM(initial_parameters=p, server_learning_rate=kw["lr"],
                                       server_momentum=kw["momentum"])
        else:
            self.strategy = {"fedadam": fs.FedAdam, "fedyogi": fs.FedYogi}[kind](initial_parameters=p, eta=kw["lr"])
        self.names = list(initial)

    def round(self, rnd: int, clients: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
        res = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([m[k] for k in self.names]), int(w), {}))
               for m, w in clients]
        return dict(zip(self.names, parameters_to_ndarrays(self.strategy.aggregate_fit(rnd, res, [])[0])))


def small_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
            "bn.running_mean": rng.standard_normal(16).astype(np.float32),
            "bn.num_batches_tracked": np.array(100, np.int64),
            "head.weight": rng.standard_normal((10, 16)).astype(np.float16),
            "head.bias": rng.standard_normal(10).astype(np.float64)}


def perturb(model: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in model.items():
        if v.dtype.kind == "f":
            out[k] = (v.astype(np.float64) + rng.standard_normal(v.shape)).astype(v.dtype)
        else:
            out[k] = (v + rng.integers(0, 20, size=v.shape)).astype(v.dtype)
    return out


class FlakyStarts:
    """A runtime factory for ``EmbeddedServer(runtime=...)``: a real local runtime (fork server,
    real function processes) whose chosen starts die: the function process is really started,
    SIGKILLed, and the start fails as it does when a function dies before its handshake.
    ``fail`` holds start numbers (1-based); ``fail_all`` makes every later start fail, as when
    functions cannot start at all."""

    def __init__(self, fail=(), fail_all: bool = False):
        self.fail, self.fail_all, self.starts = set(fail), fail_all, 0

    def __call__(self, config, arena, metrics):
        from lifl.runtime.local import LocalRuntime
        policy = self

        class Flaky(LocalRuntime):
            def start_worker(self, on_message, node="local"):
                import os
                import signal
                policy.starts += 1
                w = super().start_worker(on_message, node)
                if policy.fail_all or policy.starts in policy.fail:
                    os.kill(w.pid, signal.SIGKILL)
                    raise RuntimeError(f"aggregator function {w.id} exited during start-up")
                return w

        return Flaky(arena, spawn=config.spawn, workers=config.workers, fold_cores=config.fold_cores)


def metric(srv, name: str, **labels) -> float:
    """A sample of the server's Prometheus registry, through its public API (0 if never set)."""
    return srv.metrics.registry.get_sample_value(name, labels) or 0.0


def expect(code, match, fn, *a, **kw):
    """Call fn and check it fails with this gRPC status and a message containing ``match``."""
    import pytest
    from lifl.client import RpcFailure
    with pytest.raises(RpcFailure) as ei:
        fn(*a, **kw)
    assert ei.value.code == code, ei.value
    assert match in ei.value.message, ei.value.message
    return ei.value


# -- compressed update encodings (tests/test_encodings.py, tests/ray) ----------------------------------
def decode(arrays: dict, buf: bytes, name: str) -> dict:
    """The decoded update: float32/float64 tensors from the encoded bytes, the rest as they are.
    Independent of lifl: the contract's arithmetic (64-byte aligned tensors; a float16 word; a
    bfloat16 word shifted into float32's high bits; int8 times its 256-block's float32 scale)."""
    out, pos = {}, 0
    for k, a in arrays.items():
        pos = -(-pos // 64) * 64
        a = np.asarray(a)
        n = a.size
        if a.dtype.kind == "f" and a.dtype.itemsize >= 4 and name != "raw":
            if name == "float16":
                v = np.frombuffer(buf, "<f2", n, pos).astype(np.float64)
                pos += 2 * n
            elif name == "bfloat16":
                v = (np.frombuffer(buf, "<u2", n, pos).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
                pos += 2 * n
            else:
                nb = -(-n // 256)
                s = np.frombuffer(buf, "<f4", nb, pos).astype(np.float64)
                q = np.frombuffer(buf, np.int8, n, pos + 4 * nb).astype(np.float64)
                v = q * np.repeat(s, 256)[:n]
                pos += 4 * nb + n
            out[k] = v.reshape(a.shape)
        else:
            out[k] = a
            pos += a.nbytes
    return out


def wire_bytes(arrays: dict, name: str) -> bytes:
    """What Client.push sends for these arrays in this encoding (the client-side encoder)."""
    from lifl import encoding
    from lifl.layout import Layout
    enc = encoding.encoded(Layout.from_arrays(arrays), encoding.parse(name))
    return b"".join(bytes(c) for c in encoding.chunks(enc, encoding.encode_pieces(enc, arrays), 1 << 20))


def held_push(address: str, rid: int, client: str, arrays: dict, release, out: dict, weight: float = 1.0):
    """A push (on a thread) whose stream stops after its header and first chunk until ``release``
    (a threading.Event) is set; the outcome (a receipt or the failure) lands in ``out[client]``."""
    import threading
    from lifl.client import Client
    from lifl.layout import Layout
    from lifl.v1 import aggregation_pb2 as pb
    from lifl.wire import encode_chunk
    layout = Layout.from_arrays(arrays)
    h = pb.PushHeader(round=rid, client_id=client, num_examples=weight, total_size=layout.total_size)
    layout.to_proto(h.tensors)
    buf = bytearray(layout.total_size)
    layout.pack_into(arrays, buf)

    def messages():
        yield pb.PushRequest(header=h).SerializeToString()
        yield encode_chunk(memoryview(buf)[:4096])
        release.wait(30)
        yield encode_chunk(memoryview(buf)[4096:])

    def run():
        with Client(address, retry_s=0) as c:
            try:
                out[client] = c.push_raw(messages())
            except Exception as e:   # noqa: BLE001  (the test inspects it)
                out[client] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def poll(pred, timeout: float = 20.0) -> bool:
    """Wait for a condition on real processes, bounded (never a timing assertion)."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
