"""A faster way to run a registered model on a CPU: the same numbers (up to rounding), less time.

`fast_forward(model)` returns a function that computes `model(x)` (the same
values and gradients) for the registry's `nn.Sequential` models, with every
max-pool whose windows tile the image (LeNet-5's and the CIFAR nets' 2x2,
stride 2) run by cnnlab's compiled loops (`cnnlab.backprop.tiled_maxpool`)
instead of PyTorch's kernel, and fused with the ReLU next to it:

- relu(maxpool(x)) == maxpool(relu(x)), since ReLU is monotone, and the
  gradients agree as well: both go to the first maximum of a window, and
  nowhere when it is <= 0. So a ReLU right before or after such a pool is
  folded into it: two flat passes forward, two backward.
- PyTorch's CPU max-pool is slow at few channels (LeNet-5's first pool, 192
  images on one thread: ~7 ms forward, more for a zero-fill and a scatter
  backward); cnnlab's take 0.33 + 0.34 ms. LeNet-5 trains x1.1-1.3 faster than
  eager on two threads, depending on the CPU and the batch, and ~1.5x on one
  (`python bench/fastpath.py`).

A first convolution from one channel to fewer than 16 (LeNet-5's, 1 -> 6)
runs compiled loops too, with the tiling pool after it
(`cnnlab.backprop.wide_conv`): oneDNN pads its output to 16 channels and
converts it to and from its blocked layout on every call, which cost more than
the convolution, and the pool reads the convolution's output while it is in
the L1 cache. Those loops sum in another order, so with LeNet-5 on
one-channel images the logits and gradients equal the model's up to float
rounding (~1e-6 relative), no longer bit for bit.

One more change, for inference on a few images (serving one request at a
time): there, each other convolution runs PyTorch's im2col kernel instead of
oneDNN's, whose per-call setup dominates a tiny batch (LeNet-5's convolutions
at batch 1: ~20 us each instead of ~77). Its sums are ordered differently, so
up to SMALL_BATCH images the logits equal the model's up to float rounding
(~1e-8 on LeNet-5); above it, and whenever gradients are recorded, bit for bit.

Every other layer runs as itself, and the module's parameters are never
touched, so checkpoints, the hand-written engine and every reader of the
state_dict see the ordinary model. Forward hooks on the model or on its pools,
ReLUs and convolutions do not fire on this path. Models with no such pool,
and any device but the CPU, get `model` itself back.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cnnlab.backprop.layer import pair
from cnnlab.backprop.pool import MaxPool2d
from cnnlab.backprop.tiled_maxpool import tiled_max_pool, tiled_max_pool_backward
from cnnlab.backprop.wide_conv import WideConv2d

Forward = Callable[[torch.Tensor], torch.Tensor]

# Up to this many images, inference convolutions take PyTorch's im2col kernel: LeNet-5's are
# 2-4x faster there than oneDNN's at batch 1-8, and slower from 16 (conv2) or 32 (conv1) up.
SMALL_BATCH = 8


def fast_forward(model: nn.Module, device: torch.device | str = "cpu") -> Forward:
    """A function x -> logits equal to `model(x)`, faster on a CPU.

    x: (N, C, H, W) float on `device`; returns (N, K) logits. The function calls
    the model's own layers, so it stays valid while the model trains and follows
    its train()/eval() mode.
    """
    if torch.device(device).type != "cpu" or not isinstance(model, nn.Sequential):
        return model
    steps = _plan(list(model))
    if not any(isinstance(step, (_TiledPool, _ConvPool)) for step in steps):
        return model

    def forward(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return forward


def tiles(pool: nn.Module) -> bool:
    """Whether `pool` is a max-pool whose windows cut the image into disjoint tiles."""
    return isinstance(pool, nn.MaxPool2d) and not pool.return_indices and MaxPool2d.from_torch(pool, "").tiles()


class _TiledPool:
    """A tiling max-pool, with the ReLU beside it folded in when `relu`; `layers` are the modules it replaces."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        pool = next(layer for layer in layers if isinstance(layer, nn.MaxPool2d))
        self.kernel, self.relu = pair(pool.kernel_size), len(layers) == 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float64):  # the compiled loops take these two
            for layer in self.layers:
                x = layer(x)
            return x
        if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no graph, no autograd.Function
            return tiled_max_pool(x, self.kernel, self.relu)[0]
        return _TiledMaxPool.apply(x, self.kernel, self.relu)


class _TiledMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: tuple[int, int], relu: bool) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H // kh, W // kw)."""
        y, switch = tiled_max_pool(x, kernel, relu)
        ctx.save_for_backward(switch)
        ctx.kernel, ctx.in_shape = kernel, x.shape
        return y

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (switch,) = ctx.saved_tensors
        return tiled_max_pool_backward(dout, switch, ctx.kernel, ctx.in_shape), None, None


class _Conv:
    """A Conv2d; inference on at most SMALL_BATCH images runs PyTorch's im2col kernel instead of oneDNN's."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        # im2col takes float32 and float64, and is the faster one only for a few images without a graph
        if x.dtype not in (torch.float32, torch.float64) or len(x) > SMALL_BATCH or torch.is_grad_enabled():
            return conv(x)
        return torch.ops.aten.thnn_conv2d(x, conv.weight, conv.kernel_size, conv.bias, conv.stride, conv.padding)

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether `layer` is a convolution the im2col kernel computes: zero padding, no dilation or groups."""
        return (
            isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.dilation == (1, 1)
            and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
        )  # fmt: skip


class _ConvPool:
    """A convolution from one channel to few (LeNet-5's first, 1 -> 6) and the tiling max-pool after
    it: cnnlab's compiled loops (wide_conv.py) where the input needs no gradient (a network's
    first layer), otherwise the two steps. oneDNN pads such a convolution's output to a block of
    16 channels and converts it to and from its blocked layout on every call."""

    def __init__(self, conv: _Conv, pool: _TiledPool) -> None:
        self.conv, self.pool = conv, pool

    @staticmethod
    def fits(step: Forward, following: Forward | None) -> bool:
        """Whether `step` is such a convolution and `following` a tiling pool (with or without its ReLU)."""
        if not (isinstance(step, _Conv) and isinstance(following, _TiledPool)):
            return False
        conv = step.conv
        return conv.in_channels == 1 and conv.out_channels < 16 and conv.stride == (1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.float64) or x.requires_grad:
            return self.pool(self.conv(x))
        conv = self.conv.conv
        return WideConv2d.apply(x, conv.weight, conv.bias, conv.padding, self.pool.kernel, self.pool.relu)


def _plan(layers: list[nn.Module]) -> list[Forward]:
    """The layers in the order they run: tiling pools (and a ReLU on either side) and convolutions replaced."""
    steps: list[Forward] = []
    i = 0
    while i < len(layers):
        layer, following = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.ReLU) and tiles(following) or tiles(layer) and isinstance(following, nn.ReLU):
            steps.append(_TiledPool([layer, following]))
            i += 2
        elif tiles(layer):
            steps.append(_TiledPool([layer]))
            i += 1
        elif _Conv.fits(layer):
            steps.append(_Conv(layer))
            i += 1
        else:
            steps.append(layer)
            i += 1
    fused: list[Forward] = []
    for step in steps:
        if fused and _ConvPool.fits(fused[-1], step):
            fused[-1] = _ConvPool(fused[-1], step)
        else:
            fused.append(step)
    return fused
