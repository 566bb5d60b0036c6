"""Factories a user might write, for the frontend tests."""

from __future__ import annotations

import torch
from torch import nn

from lamc.models import Dim, ModelSpec


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.second = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def spec_factory() -> ModelSpec:
    torch.manual_seed(0)
    return ModelSpec(
        module=TwoLayer().eval(),
        example_inputs={"x": torch.randn(3, 8)},
        dynamic={"x": {0: Dim("batch", 1, 32)}},
        name="two-layer",
    )


def tuple_factory() -> tuple[
    nn.Module, tuple[torch.Tensor, ...], dict[str, dict[int, tuple[str, int, int]]]
]:
    torch.manual_seed(0)
    return TwoLayer().eval(), (torch.randn(3, 8),), {"x": {0: ("batch", 1, 32)}}


def raising_factory() -> ModelSpec:
    raise RuntimeError("checkpoint shard 3 is missing")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.sum() > 0:  # branches on a tensor value: torch.export cannot capture this
            return y * 2
        return y


def data_dependent_factory() -> ModelSpec:
    return ModelSpec(
        module=DataDependent().eval(),
        example_inputs={"x": torch.randn(2, 4)},
        name="data-dependent",
    )


def not_a_model() -> str:
    return "hello"


class LongSkip(nn.Module):
    """Block 0's output is added back after block 2: a skip spanning units and stages."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.blocks[0](x)
        y = self.blocks[2](self.blocks[1](first)) + first
        return self.blocks[3](y)


def long_skip_factory() -> ModelSpec:
    torch.manual_seed(0)
    return ModelSpec(
        module=LongSkip().eval(),
        example_inputs={"x": torch.randn(2, 16)},
        dynamic={"x": {0: Dim("batch", 1, 8)}},
        name="long-skip",
    )


def other_weights_factory() -> ModelSpec:
    """The same architecture as spec_factory with different weights."""
    torch.manual_seed(1)
    return ModelSpec(
        module=TwoLayer().eval(),
        example_inputs={"x": torch.randn(3, 8)},
        dynamic={"x": {0: Dim("batch", 1, 32)}},
        name="two-layer",
    )


def exiting_factory() -> object:
    """A factory that ends the process instead of returning a model."""
    import sys

    sys.exit(0)
