"""Parameter layouts of well-known models (real layer shapes, torchvision naming), for demos and benchmarks.

No torchvision needed: the shapes are written out. BatchNorm layers carry
``running_mean``/``running_var`` and an int64 ``num_batches_tracked`` as a real
``state_dict`` does, so integer handling is exercised too.
"""
from __future__ import annotations

import numpy as np

_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
            "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet152": ("bottleneck", (3, 8, 36, 3))}
MODELS = tuple(_RESNETS) + ("mlp1m",)


def _bn(p: str, c: int) -> list[tuple[str, tuple, str]]:
    return [(f"{p}.weight", (c,), "float32"), (f"{p}.bias", (c,), "float32"),
            (f"{p}.running_mean", (c,), "float32"), (f"{p}.running_var", (c,), "float32"),
            (f"{p}.num_batches_tracked", (), "int64")]


def _resnet(kind: str, blocks: tuple[int, ...], classes: int = 1000) -> list[tuple[str, tuple, str]]:
    out = [("conv1.weight", (64, 3, 7, 7), "float32")] + _bn("bn1", 64)
    expansion = 1 if kind == "basic" else 4
    inp = 64
    for li, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            stride = 2 if b == 0 and li > 1 else 1
            if kind == "basic":
                out += [(f"{p}.conv1.weight", (width, inp, 3, 3), "float32")] + _bn(f"{p}.bn1", width)
                out += [(f"{p}.conv2.weight", (width, width, 3, 3), "float32")] + _bn(f"{p}.bn2", width)
            else:
                out += [(f"{p}.conv1.weight", (width, inp, 1, 1), "float32")] + _bn(f"{p}.bn1", width)
                out += [(f"{p}.conv2.weight", (width, width, 3, 3), "float32")] + _bn(f"{p}.bn2", width)
                out += [(f"{p}.conv3.weight", (width * 4, width, 1, 1), "float32")] + _bn(f"{p}.bn3", width * 4)
            if b == 0 and (stride != 1 or inp != width * expansion):
                out += [(f"{p}.downsample.0.weight", (width * expansion, inp, 1, 1), "float32")]
                out += _bn(f"{p}.downsample.1", width * expansion)
            inp = width * expansion
    return out + [("fc.weight", (classes, inp), "float32"), ("fc.bias", (classes,), "float32")]


def specs(name: str) -> list[tuple[str, tuple, str]]:
    """(tensor name, shape, dtype) of a model layout."""
    if name in _RESNETS:
        return _resnet(*_RESNETS[name])
    if name == "mlp1m":  # 987,210 parameters: the "1 M-param" scaling model
        return [("fc1.weight", (1000, 784), "float32"), ("fc1.bias", (1000,), "float32"),
                ("fc2.weight", (200, 1000), "float32"), ("fc2.bias", (200,), "float32"),
                ("fc3.weight", (10, 200), "float32"), ("fc3.bias", (10,), "float32")]
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def layout_arrays(name: str, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    """Random arrays with the model's layout (floats ~ N(0, scale²), counters small ints)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, shape, dtype in specs(name):
        if dtype == "int64":
            out[n] = np.asarray(rng.integers(0, 1000), dtype=np.int64).reshape(shape)
        else:
            out[n] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
    return out


def num_params(name: str) -> int:
    """Trainable parameters (BatchNorm statistics and counters excluded)."""
    return sum(int(np.prod(shape)) for n, shape, d in specs(name) if d != "int64" and ".running_" not in n)
