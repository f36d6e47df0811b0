"""Model, synthetic data and training for the example; numpy-only layouts for benchmarks.

torch is imported lazily so that the synthetic (benchmark) models do not pay for it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

N_FEATURES, N_HIDDEN, N_CLASSES = 20, 32, 4


# -- the PyTorch model -------------------------------------------------------------
def make_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_FEATURES, N_HIDDEN), nn.ReLU(), nn.Linear(N_HIDDEN, N_CLASSES))


def load_data(partition_id: int):
    """A deterministic synthetic classification task; partitions differ in size and feature shift."""
    rng = np.random.default_rng(1000 + partition_id)
    w_true = np.random.default_rng(7).normal(size=(N_FEATURES, N_CLASSES))
    n = 48 + 16 * partition_id
    x = rng.normal(loc=0.1 * partition_id, size=(n, N_FEATURES)).astype(np.float32)
    y = (x @ w_true).argmax(axis=1).astype(np.int64)
    return x, y


def train(net, x, y, *, lr: float, steps: int, batch_size: int, seed: int) -> float:
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    total = 0.0
    for _ in range(steps):
        idx = torch.randperm(len(xt), generator=g)[:batch_size]
        opt.zero_grad()
        loss = loss_fn(net(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        total += loss.item()
    return total / max(steps, 1)


def evaluate(net, x, y) -> tuple[float, float]:
    import torch

    net.eval()
    with torch.no_grad():
        out = net(torch.from_numpy(x))
        loss = float(torch.nn.functional.cross_entropy(out, torch.from_numpy(y)))
        acc = float((out.argmax(1).numpy() == y).mean())
    return loss, acc


# -- parameter layouts for benchmarks (real layer shapes, float32) --------------------
def resnet18_shapes(num_classes: int = 1000) -> "OrderedDict[str, tuple[int, ...]]":
    """torchvision's resnet18 parameters + BN running stats (num_batches_tracked left out): 11.69 M values."""
    s: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def bn(p):
        for k in ("weight", "bias", "running_mean", "running_var"):
            s[f"{p}.{k}"] = (c_of[p],)

    c_of: dict[str, int] = {}
    s["conv1.weight"] = (64, 3, 7, 7)
    c_of["bn1"] = 64
    bn("bn1")
    cin = 64
    for li, cout in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{li}.{b}"
            stride2 = li > 1 and b == 0
            s[f"{p}.conv1.weight"] = (cout, cin if b == 0 else cout, 3, 3)
            c_of[f"{p}.bn1"] = cout
            bn(f"{p}.bn1")
            s[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            c_of[f"{p}.bn2"] = cout
            bn(f"{p}.bn2")
            if stride2:
                s[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                c_of[f"{p}.downsample.1"] = cout
                bn(f"{p}.downsample.1")
        cin = cout
    s["fc.weight"] = (num_classes, 512)
    s["fc.bias"] = (num_classes,)
    return s


def one_m_shapes() -> "OrderedDict[str, tuple[int, ...]]":
    """A 1,000,000-parameter MLP-like layout (four tensors)."""
    return OrderedDict([("fc1.weight", (1000, 784)), ("fc1.bias", (1000,)),
                        ("fc2.weight", (214, 1000)), ("fc2.bias", (1000,))])


def synthetic_shapes(model: str) -> "OrderedDict[str, tuple[int, ...]]":
    if model == "synthetic-resnet18":
        return resnet18_shapes()
    if model == "synthetic-1m":
        return one_m_shapes()
    raise ValueError(f"unknown synthetic model {model!r}")


def synthetic_arrays(model: str, seed: int) -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(seed)
    return OrderedDict((k, rng.standard_normal(shape, dtype=np.float32))
                       for k, shape in synthetic_shapes(model).items())


# -- a numpy-only model (softmax regression), for fast smoke tests: no torch import ------------
def logreg_init() -> "OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(0)
    return OrderedDict([("w", (0.1 * rng.standard_normal((N_FEATURES, N_CLASSES))).astype(np.float32)),
                        ("b", np.zeros(N_CLASSES, np.float32))])


def logreg_train(params, x, y, *, lr: float, steps: int, batch_size: int, seed: int):
    w, b = params["w"].astype(np.float32).copy(), params["b"].astype(np.float32).copy()
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(steps):
        idx = rng.permutation(len(x))[:batch_size]
        xb, yb = x[idx], y[idx]
        z = xb @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        total += float(-np.log(p[np.arange(len(yb)), yb] + 1e-12).mean())
        p[np.arange(len(yb)), yb] -= 1.0
        w -= lr * (xb.T @ p) / len(yb)
        b -= lr * p.mean(axis=0)
    return OrderedDict([("w", w), ("b", b)]), total / max(steps, 1)
