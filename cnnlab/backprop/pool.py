"""Pooling layers: max, average, and global (adaptive) average, forward and backward.

Max pooling passes each window's largest value through, so its gradient flows
back to that one position only (the "switch"); every other input gets zero.
Average pooling spreads each output's gradient evenly over its window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.backprop.layer import Layer, pair
from cnnlab.errors import CnnlabError


class MaxPool2d(Layer):
    """y[n, c, p, q] = max over the window of x at (p, q), like nn.MaxPool2d.

    x: (N, C, H, W) -> y: (N, C, OH, OW). backward: dx[n, c, argmax window(p, q)] += dout[n, c, p, q],
    the argmax being the first maximum in the window (row by row) where there are ties, as in torch.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        ceil_mode: bool = False,
        path: str = "",
    ) -> None:
        super().__init__(path)
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride) if stride else self.kernel_size
        self.padding, self.dilation, self.ceil_mode = pair(padding), pair(dilation), ceil_mode

    @classmethod
    def from_torch(cls, module: nn.MaxPool2d, path: str) -> MaxPool2d:
        if module.return_indices:
            raise CnnlabError(f"MaxPool2d '{path}' returns indices: cnnlab's backprop takes layers with one output")
        return cls(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> y: (N, C, OH, OW)."""
        self._check_input(x, x.dim() == 4, "(N, C, H, W)")
        # The library kernel finds the maxima and, in the same pass, where they are: `argmax`
        # holds for each output the flat index (row * W + column) of its maximum in the (H, W)
        # plane of x. (With fast=True, pools whose windows tile the image run compiled loops
        # instead: cnnlab.backprop.fused.)
        y, argmax = F.max_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode, return_indices=True
        )
        self._save(y.shape, x.shape, argmax)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        """dout: (N, C, OH, OW) -> dx: (N, C, H, W), zero except at each window's maximum."""
        x_shape, where = self._take(dout)
        n, c, h, w = x_shape
        dx = dout.new_zeros(n, c, h * w)
        # Adding (not assigning) is what the chain rule says where windows overlap and one
        # input is the maximum of several of them.
        dx.scatter_add_(2, where.flatten(2), dout.flatten(2))
        return dx.view(n, c, h, w)


class AvgPool2d(Layer):
    """y[n, c, p, q] = mean of x over the window at (p, q), like nn.AvgPool2d (ceil_mode off).

    x: (N, C, H, W) -> y: (N, C, OH, OW). backward: each input pixel gets dout / divisor from
    every window it lies in; the divisor is kh * kw, or with count_include_pad=False the
    number of real (unpadded) pixels in the window.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        path: str = "",
    ) -> None:
        super().__init__(path)
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride) if stride else self.kernel_size
        self.padding = pair(padding)
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    @classmethod
    def from_torch(cls, module: nn.AvgPool2d, path: str) -> AvgPool2d:
        if module.ceil_mode:
            raise CnnlabError(f"AvgPool2d '{path}' uses ceil_mode=True: cnnlab's backprop has ceil_mode=False only")
        return cls(module.kernel_size, module.stride, module.padding, module.count_include_pad,
                   module.divisor_override, path)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> y: (N, C, OH, OW)."""
        self._check_input(x, x.dim() == 4, "(N, C, H, W)")
        y = F.avg_pool2d(
            x, self.kernel_size, self.stride, self.padding, False, self.count_include_pad, self.divisor_override
        )
        self._save(y.shape, x.shape)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        """dout: (N, C, OH, OW) -> dx: (N, C, H, W)."""
        (x_shape,) = self._take(dout)
        n, c, h, w = x_shape
        kh, kw = self.kernel_size
        share = dout / self._divisor(dout, h, w)  # (N, C, OH, OW): what each window pixel receives
        # col2im: give every one of the kh*kw positions of each window its share, then let
        # `fold` add the overlapping windows back onto the (padded) image and crop the padding.
        columns = share.flatten(2).unsqueeze(2).expand(n, c, kh * kw, share.shape[2] * share.shape[3])
        dx = F.fold(columns.reshape(n, c * kh * kw, -1), (h, w), self.kernel_size, padding=self.padding,
                    stride=self.stride)  # fmt: skip
        return dx

    def _divisor(self, dout: torch.Tensor, h: int, w: int) -> torch.Tensor | int:
        kh, kw = self.kernel_size
        if self.divisor_override:
            return self.divisor_override
        if self.count_include_pad:
            return kh * kw
        # How many real pixels each window covers: the window sum of an image of ones.
        ones = dout.new_ones(1, 1, h, w)
        return F.avg_pool2d(ones, self.kernel_size, self.stride, self.padding, False, True) * (kh * kw)


class AdaptiveAvgPool2d(Layer):
    """Average pooling to a fixed output size, like nn.AdaptiveAvgPool2d, when it divides the input.

    x: (N, C, H, W) -> y: (N, C, oh, ow) with H % oh == 0 and W % ow == 0: then it is average
    pooling with kernel = stride = (H / oh, W / ow). (1, 1) is the global average pool.
    """

    def __init__(self, output_size: int | tuple[int, int], path: str = "") -> None:
        super().__init__(path)
        self.output_size = pair(output_size)
        self._pool: AvgPool2d | None = None

    @classmethod
    def from_torch(cls, module: nn.AdaptiveAvgPool2d, path: str) -> AdaptiveAvgPool2d:
        if module.output_size is None or None in pair(module.output_size):
            raise CnnlabError(f"AdaptiveAvgPool2d '{path}' keeps an input dimension (size None): not supported")
        return cls(module.output_size, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> y: (N, C, oh, ow)."""
        oh, ow = self.output_size
        self._check_input(x, x.dim() == 4, "(N, C, H, W)")
        if x.shape[2] % oh or x.shape[3] % ow:
            raise CnnlabError(
                f"{self} pools to {oh}x{ow}, which does not divide the input of shape {tuple(x.shape)}: "
                "cnnlab's backprop needs sizes that divide evenly"
            )
        kernel = (x.shape[2] // oh, x.shape[3] // ow)
        self._pool = AvgPool2d(kernel, path=self.path)
        return self._pool.forward(x)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        if self._pool is None:
            raise CnnlabError(f"{self}: backward() needs a forward() first (each forward allows one backward)")
        pool, self._pool = self._pool, None
        return pool.backward(dout)
