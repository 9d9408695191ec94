"""Which layers of a model run which of cnnlab's kernels: the plan both engines follow.

`plan(model)` walks an `nn.Sequential` and groups its layers into steps:

- `TiledPool`: a max-pool whose windows tile the image (LeNet-5's and the CIFAR
  nets' 2x2, stride 2), with the ReLU right before or after it folded in, run
  by `tiled_maxpool`'s loops. relu(maxpool(x)) == maxpool(relu(x)), since ReLU
  is monotone, and the gradients agree too: both go to the window's first
  maximum, and nowhere when it is <= 0. PyTorch's CPU max-pool is slowest at
  few channels (LeNet-5's first pool, 192 images on one thread: ~7 ms
  forward); these loops take two flat passes each way.
- `ConvPool`: a convolution from one channel to fewer than 16 (LeNet-5's
  first, 1 -> 6) and the tiling pool after it, run by `conv_pool`'s loops.
  oneDNN pads such a convolution's output to a block of 16 channels and
  converts it to and from its blocked layout on every call, which cost more
  than the convolution; the loops also pool each channel while it is in L1.
- `SmallBatchConv`: any other plain convolution. For inference on a few images
  it takes PyTorch's im2col kernel, whose per-call setup is smaller than
  oneDNN's (LeNet-5's convolutions at batch 1: ~20 us each instead of ~77).
- every other layer: itself.

The plan only names modules; the autograd engine and inference run it through
`cnnlab.fast.forward`, the hand-written engine through the fused layers of
`cnnlab.backprop.fused`. Both read the module's own parameters at every call,
so a plan stays valid while the model trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cnnlab.fast.tiled_maxpool import tiles

# Up to this many images, inference convolutions take PyTorch's im2col kernel: LeNet-5's are
# 2-4x faster there than oneDNN's at batch 1-8, and slower from 16 (conv2) or 32 (conv1) up.
SMALL_BATCH = 8


@dataclass(frozen=True)
class TiledPool:
    """A tiling max-pool, with the ReLU beside it folded in when `relu`; `modules` are the layers it replaces."""

    kernel: tuple[int, int]
    relu: bool
    modules: tuple[nn.Module, ...]


@dataclass(frozen=True)
class ConvPool:
    """A one-channel convolution, then a tiling pool (and its ReLU): `conv_pool`'s loops."""

    conv: nn.Conv2d
    pool: TiledPool


@dataclass(frozen=True)
class SmallBatchConv:
    """A convolution that inference on at most SMALL_BATCH images runs with the im2col kernel."""

    conv: nn.Conv2d


Step = TiledPool | ConvPool | SmallBatchConv | nn.Module


def plan(model: nn.Module) -> list[Step] | None:
    """The steps `model` runs as, in order; None when nothing in it has a faster kernel (or it is no Sequential)."""
    if not isinstance(model, nn.Sequential):
        return None
    steps = _fuse_conv_pools(_group_pools(list(model)))
    if not any(isinstance(step, (TiledPool, ConvPool)) for step in steps):
        return None
    return steps


def tiling_pool(layer: nn.Module | None) -> bool:
    """Whether `layer` is a max-pool whose windows cut the image into disjoint tiles."""
    if not isinstance(layer, nn.MaxPool2d) or layer.return_indices:
        return False
    kernel = _pair(layer.kernel_size)
    stride = _pair(layer.stride) if layer.stride else kernel
    return tiles(kernel, stride, _pair(layer.padding), _pair(layer.dilation), layer.ceil_mode)


def plain_conv(layer: nn.Module) -> bool:
    """Whether `layer` is a convolution with zero padding given in pixels, no dilation and no groups."""
    return (
        isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.dilation == (1, 1)
        and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    )  # fmt: skip


def _group_pools(layers: list[nn.Module]) -> list[Step]:
    """Tiling pools (with a ReLU on either side) and plain convolutions as steps; the rest as they are."""
    steps: list[Step] = []
    i = 0
    while i < len(layers):
        layer, following = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.ReLU) and tiling_pool(following) or tiling_pool(layer) and isinstance(following, nn.ReLU):
            pool = following if isinstance(layer, nn.ReLU) else layer
            steps.append(TiledPool(_pair(pool.kernel_size), True, (layer, following)))
            i += 2
            continue
        if tiling_pool(layer):
            steps.append(TiledPool(_pair(layer.kernel_size), False, (layer,)))
        elif plain_conv(layer):
            steps.append(SmallBatchConv(layer))
        else:
            steps.append(layer)
        i += 1
    return steps


def _fuse_conv_pools(steps: list[Step]) -> list[Step]:
    """Each one-channel convolution to fewer than 16 channels, stride 1, followed by a tiling pool: one step."""
    fused: list[Step] = []
    for step in steps:
        previous = fused[-1] if fused else None
        if isinstance(step, TiledPool) and isinstance(previous, SmallBatchConv):
            conv = previous.conv
            if conv.in_channels == 1 and conv.out_channels < 16 and conv.stride == (1, 1):
                fused[-1] = ConvPool(conv, step)
                continue
        fused.append(step)
    return fused


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
