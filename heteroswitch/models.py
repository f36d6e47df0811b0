"""Small ResNet-style CNNs (no torchvision: it has no CPU build here).

GroupNorm is the default normalisation on purpose: federated averaging and
SWAD average weights, and GroupNorm has no running statistics, so an average
of models is again a consistent model, and no integer buffer
(``num_batches_tracked``) has to be averaged by the aggregator.  ``norm="batch"``
is available; then see :mod:`heteroswitch.swad` for the BatchNorm policy, and
note that LIFL averages and rounds integer tensors.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallResNet", "make_model"]


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, c), c)
    if kind == "batch":
        return nn.BatchNorm2d(c)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """Stem conv + ``len(blocks)`` stages (widths ``width * 2**i``, stride 2
    after the first) + global average pool + linear head."""

    def __init__(self, num_classes: int = 12, width: int = 16, blocks: tuple[int, ...] = (1, 1, 1),
                 norm: str = "group") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm(norm, width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, norm))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inputs are display-referred images in [0, 1]; centre them
        y = self.stages(self.stem(x * 2.0 - 1.0))
        return self.head(y.mean(dim=(2, 3)))


def make_model(num_classes: int = 12, width: int = 16, blocks=(1, 1, 1), norm: str = "group", seed: int = 0) -> SmallResNet:
    """Build a model with deterministic initial weights for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallResNet(num_classes, width, tuple(blocks), norm)
