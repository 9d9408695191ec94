"""The 2-d convolution layer, forward and backward.

Forward, for output channel o at output position (p, q), with stride s,
dilation d and the input zero-padded to x_pad:

    y[n, o, p, q] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, p*s + i*d, q*s + j*d]

Every weight meets every output position, and every input pixel feeds a
kh x kw patch of outputs, so the chain rule gives (docs/backprop.md derives it):

    db[o]          = sum_{n, p, q} dout[n, o, p, q]
    dw[o, c, i, j] = sum_{n, p, q} dout[n, o, p, q] * x_pad[n, c, p*s + i*d, q*s + j*d]
                     (a correlation of the input with the output gradient)
    dx             = conv_transpose2d(dout, w, stride s, padding, dilation d)
                     (each dout[n, o, p, q] sends w[o] back onto the patch it came from)

In im2col terms: with X the (C*kh*kw, OH*OW) matrix of patches of one image,
y = W X + b with W the (O, C*kh*kw) weight matrix, so dW = dY X^T and
dX = W^T dY, folded back onto the image (col2im). tests/backprop/test_conv.py
checks the code below against exactly that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.backprop.layer import Layer, pair
from cnnlab.errors import CnnlabError


class Conv2d(Layer):
    """Convolution like nn.Conv2d (zero padding, any stride, dilation and groups).

    w: (O, C/groups, kh, kw); b: (O,) or None.
    x: (N, C, H, W) -> y: (N, O, OH, OW), OH = (H + 2*ph - dh*(kh - 1) - 1) // sh + 1.
    """

    def __init__(
        self,
        w: torch.Tensor,
        b: torch.Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        path: str = "",
    ) -> None:
        super().__init__(path)
        self.params["weight"] = w
        if b is not None:
            self.params["bias"] = b
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self.groups = groups
        self.in_channels = w.shape[1] * groups

    @classmethod
    def from_torch(cls, module: nn.Conv2d, path: str) -> Conv2d:
        if module.padding_mode != "zeros":
            raise CnnlabError(
                f"Conv2d '{path}' pads with '{module.padding_mode}': cnnlab's backprop has zero padding only"
            )
        padding = module.padding
        if isinstance(padding, str):
            padding = _padding_from_name(module, path)
        bias = module.bias.detach() if module.bias is not None else None
        return cls(module.weight.detach(), bias, module.stride, padding, module.dilation, module.groups, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> y: (N, O, OH, OW)."""
        self._check_input(x, x.dim() == 4 and x.shape[1] == self.in_channels, f"(N, {self.in_channels}, H, W)")
        w, b = self.params["weight"], self.params.get("bias")
        try:
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
            raise CnnlabError(f"{self} cannot take input of shape {tuple(x.shape)}: {reason}") from None
        self._save(y.shape, x)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        """dout: (N, O, OH, OW) -> dx: (N, C, H, W), or None when `input_grad` is off; fills dw, db."""
        (x,) = self._take(dout)
        w = self.params["weight"]
        # Each sum of the module docstring is computed as a convolution, so the backward pass
        # runs on the same optimised kernels as the forward one, called as plain functions of
        # plain tensors (no graph is recorded). An im2col version (unfold, matmul, fold) gives
        # the same numbers about 3x slower on a CPU for LeNet-5's layers; test_conv.py checks
        # the two agree.
        if "bias" in self.params:
            self.grads["bias"] = dout.sum(dim=(0, 2, 3))
        self.grads["weight"] = self._weight_grad(x, dout, w.shape)
        # The first layer's input is the images, which need no gradient: skipping dx there
        # matters, since for LeNet-5's one-channel input dx costs ten times what dw costs.
        if not self.input_grad:
            return None
        # dx: every dout[n, o, p, q] sends w[o] back onto the patch it came from, which is a
        # transposed convolution. A stride that did not divide the input dropped the last
        # rows/columns; output_padding gives them back (with zero gradient).
        output_padding = [
            (size + 2 * p - d * (k - 1) - 1) % s
            for size, p, d, k, s in zip(x.shape[2:], self.padding, self.dilation, w.shape[2:], self.stride)
        ]
        return F.conv_transpose2d(
            dout, w, None, self.stride, self.padding, output_padding, self.groups, self.dilation
        )

    def _weight_grad(self, x: torch.Tensor, dout: torch.Tensor, w_shape: torch.Size) -> torch.Tensor:
        """dw[o, c, i, j] = sum_{n, p, q} dout[n, o, p, q] x_pad[n, c, p*s + i*d, q*s + j*d].

        Swap the batch and channel axes and this is an ordinary convolution: the C input
        channels become C "images" of N channels, and dout's O channels become O filters of
        N channels, spread out by the stride (so the stride becomes a dilation). Its output
        holds the sum for every offset; the kernel's taps are every d-th one of the first.
        x: (N, C, H, W), dout: (N, O, OH, OW) -> dw: (O, C/groups, kh, kw).
        """
        kh, kw = w_shape[2:]
        per_group = []
        for xg, dg in zip(x.chunk(self.groups, dim=1), dout.chunk(self.groups, dim=1)):
            full = F.conv2d(xg.transpose(0, 1), dg.transpose(0, 1), padding=self.padding, dilation=self.stride)
            taps = full[:, :, :: self.dilation[0], :: self.dilation[1]][:, :, :kh, :kw]  # (C/g, O/g, kh, kw)
            per_group.append(taps.transpose(0, 1))
        return torch.cat(per_group) if self.groups > 1 else per_group[0].contiguous()


def _padding_from_name(module: nn.Conv2d, path: str) -> tuple[int, int]:
    """padding='valid' is 0; 'same' is (k - 1) * d / 2 on each side when that is a whole number."""
    if module.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if any(t % 2 for t in total):
        raise CnnlabError(f"Conv2d '{path}' uses padding='same' with an even kernel (uneven padding): not supported")
    return (total[0] // 2, total[1] // 2)
