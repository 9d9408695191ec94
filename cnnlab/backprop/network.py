"""A network of hand-written layers, built from a torch model definition.

`Sequential.from_torch(model)` walks an `nn.Sequential` and builds the matching
hand-written layer for each module. The layers' parameters and buffers are
views of the module's own tensors (same storage), so the hand-written backward
pass and optimizer train the `nn.Module` in place; evaluation, checkpoints and
export keep using the module. Names follow the module's state_dict ("3.weight").

The network's forward runs the layers in order; its backward runs their
backward passes in reverse, each turning dL/d(its output) into dL/d(its input).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cnnlab.backprop.activations import Dropout, ReLU, Sigmoid, Tanh
from cnnlab.backprop.conv import Conv2d
from cnnlab.backprop.fused import ConvPool, TiledMaxPool
from cnnlab.backprop.layer import Layer
from cnnlab.backprop.linear import Flatten, Linear
from cnnlab.backprop.norm import BatchNorm1d, BatchNorm2d
from cnnlab.backprop.pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from cnnlab.backprop.recurrent import row_reader_from_torch
from cnnlab.errors import CnnlabError
from cnnlab.fast.plan import ConvPool as ConvPoolStep
from cnnlab.fast.plan import SmallBatchConv, Step, TiledPool, plan
from cnnlab.models.recurrent import RowReader
from cnnlab.models.resnet import Residual as ResidualModule


class Sequential(Layer):
    """Layers applied in order: y = f_L(... f_2(f_1(x))); backward: dx = f_1'(... f_L'(dout))."""

    def __init__(self, layers: list[Layer], path: str = "") -> None:
        super().__init__(path)
        self.layers = layers

    @classmethod
    def from_torch(cls, module: nn.Sequential, path: str = "", fast: bool = False) -> Sequential:
        """The hand-written twin of `module`, sharing its parameters and buffers.

        fast: where `cnnlab.fast.plan` has a compiled kernel for some of its layers (tiling
        max-pools and their ReLUs, a one-channel first convolution with its pool), build the
        fused layer that runs it (fused.py) instead of one layer per module. CPU only.
        """
        if not isinstance(module, nn.Sequential):
            raise CnnlabError(f"cnnlab's backprop builds networks from nn.Sequential, got {type(module).__name__}")
        names = {id(child): _join(path, name) for name, child in module.named_children()}
        steps = (plan(module) if fast else None) or list(module.children())
        return cls([_layer_from_step(step, names) for step in steps], path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def train(self, mode: bool = True) -> Sequential:
        self.training = mode
        for layer in self.layers:
            layer.train(mode)
        return self

    def skip_input_grad(self) -> None:
        """Tell the first layer that dL/dx of the network's input is not wanted (saves its dx)."""
        first = self
        while isinstance(first, Sequential) and first.layers:
            first = first.layers[0]
        first.input_grad = False

    def _named(self, *kinds: str) -> list[tuple[str, torch.Tensor]]:
        return [item for layer in self.layers for item in layer._named(*kinds)]


class Residual(Layer):
    """y = relu(body(x) + shortcut(x)), the skip connection of cnnlab.models.resnet.

    x: (N, C, H, W) -> y: (N, C', H', W'); an empty shortcut is the identity.
    backward: with dz = dout * [y > 0], both branches receive dz, and x gets the sum
    of what they send back: dx = body'(dz) + shortcut'(dz). The "+ dz" of an identity
    shortcut is the gradient highway that lets deep residual networks train.
    """

    def __init__(self, body: Sequential, shortcut: Sequential, path: str = "") -> None:
        super().__init__(path)
        self.body, self.shortcut = body, shortcut

    @classmethod
    def from_torch(cls, module: nn.Module, path: str) -> Residual:
        """From a cnnlab.models.resnet.Residual: its `body` and `shortcut` are nn.Sequential."""
        return cls(Sequential.from_torch(module.body, _join(path, "body")),
                   Sequential.from_torch(module.shortcut, _join(path, "shortcut")), path)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.body.forward(x) + self.shortcut.forward(x))
        self._save(y.shape, y)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        (y,) = self._take(dout)
        dz = dout * torch.sign(y)  # [y > 0], as in ReLU.backward
        return self.body.backward(dz) + self.shortcut.backward(dz)

    def train(self, mode: bool = True) -> Residual:
        self.training = mode
        self.body.train(mode)
        self.shortcut.train(mode)
        return self

    def _named(self, *kinds: str) -> list[tuple[str, torch.Tensor]]:
        return self.body._named(*kinds) + self.shortcut._named(*kinds)


# The torch module types cnnlab can rebuild, and how. Exact types: a subclass may
# compute something else in its forward, which the hand-written backward would not know.
_BUILDERS: dict[type, Callable[[nn.Module, str], Layer]] = {
    nn.Sequential: Sequential.from_torch,
    nn.Conv2d: Conv2d.from_torch,
    nn.Linear: Linear.from_torch,
    nn.MaxPool2d: MaxPool2d.from_torch,
    nn.AvgPool2d: AvgPool2d.from_torch,
    nn.AdaptiveAvgPool2d: AdaptiveAvgPool2d.from_torch,
    nn.BatchNorm1d: BatchNorm1d.from_torch,
    nn.BatchNorm2d: BatchNorm2d.from_torch,
    nn.Dropout: Dropout.from_torch,
    nn.Flatten: Flatten.from_torch,
    nn.ReLU: lambda module, path: ReLU(path),
    nn.Tanh: lambda module, path: Tanh(path),
    nn.Sigmoid: lambda module, path: Sigmoid(path),
    nn.Identity: lambda module, path: Sequential([], path),
    RowReader: row_reader_from_torch,
}


def layer_from_torch(module: nn.Module, path: str = "") -> Layer:
    """The hand-written layer for one torch module, sharing its tensors; path: its name in the model."""
    build = Residual.from_torch if isinstance(module, ResidualModule) else _BUILDERS.get(type(module))
    if build is None:
        known = ", ".join(sorted([*(t.__name__ for t in _BUILDERS), "Residual"]))
        where = f" (module '{path}' of the model)" if path else ""
        raise CnnlabError(
            f"cnnlab's backprop has no hand-written layer for {type(module).__name__}{where}: "
            f"use --engine autograd, or build the model from {known}"
        )
    return build(module, path)


def _layer_from_step(step: Step, names: dict[int, str]) -> Layer:
    """The layer for one step of a fast plan (or one module), named after the module it starts with."""
    if isinstance(step, TiledPool):
        return TiledMaxPool.from_step(step, names[id(step.modules[0])])
    if isinstance(step, ConvPoolStep):
        return ConvPool.from_step(step, names[id(step.conv)])
    module = step.conv if isinstance(step, SmallBatchConv) else step
    return layer_from_torch(module, names[id(module)])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
