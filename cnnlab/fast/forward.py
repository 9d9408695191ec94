"""A registered model's forward pass on cnnlab's kernels, for autograd training and for inference.

`fast_forward(model)` returns a function that computes `model(x)` (the same
values and, through torch.autograd, the same gradients) by following
`plan(model)`: tiling max-pools and the ReLU beside them, and LeNet-5's first
convolution with its pool, run as compiled loops; see `cnnlab.fast.plan` for
why each step is faster. What the steps change in the numbers:

- the pools and ReLUs make no rounding, so they are bit for bit the model's;
- `conv_pool` sums in another order than oneDNN, so with LeNet-5 on
  one-channel images the logits and gradients equal the model's up to float
  rounding (~1e-6 relative);
- inference on up to SMALL_BATCH images runs other convolutions with the
  im2col kernel, equal to the model's up to float rounding (~1e-8 on LeNet-5).

Every other layer runs as itself, and the module's parameters are never
touched, so checkpoints, the hand-written engine and every reader of the
state_dict see the ordinary model. Forward hooks on the model or on its pools,
ReLUs and convolutions do not fire on this path. Models with no such pool, and
any device but the CPU, get `model` itself back.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cnnlab.fast.conv_pool import conv_pool, conv_pool_input_grad, conv_pool_weight_grad
from cnnlab.fast.plan import SMALL_BATCH, ConvPool, SmallBatchConv, Step, TiledPool, plan
from cnnlab.fast.tiled_maxpool import tiled_max_pool, tiled_max_pool_backward

Forward = Callable[[torch.Tensor], torch.Tensor]
COMPILED_DTYPES = (torch.float32, torch.float64)  # what the compiled loops take


def fast_forward(model: nn.Module, device: torch.device | str = "cpu") -> Forward:
    """A function x -> logits equal to `model(x)`, faster on a CPU.

    x: (N, C, H, W) float on `device`; returns (N, K) logits. The function calls
    the model's own layers, so it stays valid while the model trains and follows
    its train()/eval() mode.
    """
    steps = plan(model) if torch.device(device).type == "cpu" else None
    if steps is None:
        return model
    calls = [_call(step) for step in steps]

    def forward(x: torch.Tensor) -> torch.Tensor:
        for call in calls:
            x = call(x)
        return x

    return forward


def _call(step: Step) -> Forward:
    if isinstance(step, TiledPool):
        return lambda x: _tiled_pool(step, x)
    if isinstance(step, ConvPool):
        return lambda x: _conv_pool(step, x)
    if isinstance(step, SmallBatchConv):
        return lambda x: _small_batch_conv(step.conv, x)
    return step


def _layers(modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


def _tiled_pool(step: TiledPool, x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C, H // kh, W // kw)."""
    if x.dtype not in COMPILED_DTYPES:
        return _layers(step.modules, x)
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no graph, no autograd.Function
        return tiled_max_pool(x, step.kernel, step.relu)[0]
    return TiledMaxPool2d.apply(x, step.kernel, step.relu)


def _conv_pool(step: ConvPool, x: torch.Tensor) -> torch.Tensor:
    """x: (N, 1, H, W) -> (N, O, OH // ph, OW // pw)."""
    if x.dtype not in COMPILED_DTYPES:
        return _layers(step.pool.modules, step.conv(x))
    conv, pool = step.conv, step.pool
    return ConvPool2d.apply(x, conv.weight, conv.bias, conv.padding, pool.kernel, pool.relu)


def _small_batch_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # im2col takes float32 and float64, and is the faster one only for a few images without a graph
    if x.dtype not in COMPILED_DTYPES or len(x) > SMALL_BATCH or torch.is_grad_enabled():
        return conv(x)
    return torch.ops.aten.thnn_conv2d(x, conv.weight, conv.kernel_size, conv.bias, conv.stride, conv.padding)


class TiledMaxPool2d(torch.autograd.Function):
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


class ConvPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, pool, relu):  # x: (N, C, H, W) -> (N, O, OH // ph, OW // pw)
        y, switch = conv_pool(x, weight, bias, padding, pool, relu)
        ctx.save_for_backward(x, weight, switch)
        ctx.padding, ctx.pool, ctx.has_bias = padding, pool, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: (N, O, POH, POW) -> gradients of x, weight (O, C, KH, KW) and bias (O,)
        x, weight, switch = ctx.saved_tensors
        dweight, dbias = conv_pool_weight_grad(x, dy, switch, weight.shape, ctx.padding, ctx.pool)
        dx = None
        if ctx.needs_input_grad[0]:  # not the network's first layer: seldom
            dx = conv_pool_input_grad(dy, switch, weight, ctx.padding, ctx.pool, x.shape)
        return dx, dweight, dbias if ctx.has_bias else None, None, None, None
