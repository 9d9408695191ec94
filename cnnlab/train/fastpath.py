"""A faster way to run a registered model on a CPU: the same numbers, less time.

`fast_forward(model)` returns a function that computes `model(x)` (the same
values and gradients, up to float rounding) for plain conv nets of the
registry, using two tricks that PyTorch's CPU kernels reward. Both are
measured, one at a time, by `bench/fastpath.py`; on a 2-core AVX-512 CPU,
LeNet-5 trains about 1.2x faster with them at batch 128 to 512 (see
docs/performance.md).

1. Channels-last activations. oneDNN's convolutions and PyTorch's max-pool
   run faster on (N, H, W, C) memory than on (N, C, H, W). A 1-channel input
   cannot say which layout it is in, so the layout is chosen through the
   weights: each conv is called with its weight copied to channels-last
   (a few thousand numbers), which makes its output channels-last, and the
   layers after it keep that layout. The module's own parameters are never
   changed, so checkpoints, the hand-written engine and every other reader
   of the state_dict see ordinary contiguous tensors. Evaluation gains more
   than training: about 2.3x at batch 1024, where the default layout is slowest.

2. Max-pool before ReLU. relu(maxpool(x)) == maxpool(relu(x)) because ReLU
   is monotone, and the gradients agree too: both send the gradient to the
   first maximum of a window, and to nothing when that maximum is <= 0. Doing
   the pool first runs the ReLU (forward and backward) on a quarter of the
   numbers.

The fast path takes plain conv nets only: an `nn.Sequential` of Conv2d,
ReLU, MaxPool2d, Flatten, Linear and Dropout (lenet5, simple_cnn, cifar_cnn).
Anything else (another device, batch norm, residual blocks) gets `model`
itself back: PyTorch's channels-last batch norm accumulates in a less precise
order (about 10x the rounding error of its default kernel), which a ResNet's
backward amplifies into 1e-2 relative differences in some weight gradients.
Forward hooks on the model or on its convolutions do not fire on this path.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor]

# Layers whose channels-last kernels give the default kernels' results up to rounding.
_PLAIN_LAYERS = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear, nn.Dropout)


def fast_forward(
    model: nn.Module, device: torch.device | str = "cpu", channels_last: bool = True, pool_before_relu: bool = True
) -> Forward:
    """A function x -> logits equal to `model(x)`, faster on a CPU.

    x: (N, C, H, W) float32 on `device`; returns (N, K) logits. The function reads
    the model's layers and parameters at call time, so it stays valid while the
    model trains, and follows the model's train()/eval() mode. The two flags
    turn the tricks off one at a time, for bench/fastpath.py.
    """
    if torch.device(device).type != "cpu":
        return model
    if not isinstance(model, nn.Sequential) or not all(isinstance(layer, _PLAIN_LAYERS) for layer in model):
        return model
    if not any(isinstance(layer, nn.Conv2d) for layer in model) or not (channels_last or pool_before_relu):
        return model
    steps = _plan(list(model), channels_last, pool_before_relu)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return forward


def _plan(layers: list[nn.Module], channels_last: bool, pool_before_relu: bool) -> list[Forward]:
    """The layers in the order they run: ReLU -> MaxPool2d pairs swapped, convs channels-last."""
    steps: list[Forward] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if pool_before_relu and isinstance(layer, nn.ReLU) and isinstance(following, nn.MaxPool2d):
            steps += [following, layer]
            i += 2
            continue
        steps.append(_channels_last_conv(layer) if channels_last and _plain_conv(layer) else layer)
        i += 1
    return steps


def _plain_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"


def _channels_last_conv(conv: nn.Conv2d) -> Forward:
    def forward(x: torch.Tensor) -> torch.Tensor:
        # .to() rather than .contiguous(): a 1-channel weight already counts as
        # channels-last, and .contiguous() would hand it back unchanged. The copy
        # is differentiable; the gradient returns in the parameter's own layout.
        weight = conv.weight.to(memory_format=torch.channels_last)
        return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    return forward

