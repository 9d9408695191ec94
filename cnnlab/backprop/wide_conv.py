"""A convolution with few input channels (LeNet-5's first), forward and weight gradient, as compiled loops.

oneDNN, which PyTorch's CPU convolutions run on, computes in blocks of 16
channels: LeNet-5's first convolution (1 -> 6 channels) is padded to 16, and
its output and the gradient coming back are converted between PyTorch's NCHW
and the blocked layout on every step. Those two conversions took longer than
the convolution itself (`python bench/onednn_primitives.py`).

These loops read and write NCHW directly. The trick that makes them fast is
to compute each output row at the input's pitch: output position k = i * W + j
(row i, column j of an H x W input) reads input positions k + p * W + q for
each tap (p, q), so one flat loop over k covers a whole output plane with
contiguous loads, which LLVM vectorizes; the W - OW columns at the end of each
row are junk and are dropped (forward) or held at zero (weight gradient).

The sums run in another order than oneDNN's, so values and gradients equal
PyTorch's up to float rounding (relative ~1e-6), not bit for bit. The input's
gradient is not computed: this is for a network's first layer, whose input
needs none. Stride 1, no dilation, no groups; padding is applied to the input
first. Weights and bias are (O, C, KH, KW) and (O,).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.compiled import compiled


class WideConv2d(torch.autograd.Function):
    """y = F.conv2d(x, weight, bias, padding=padding) for an x that needs no gradient; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):  # x: (N, C, H, W) -> (N, O, OH, OW)
        x = x.detach()
        if padding != (0, 0):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        x = x.contiguous()  # (N, C, H + 2 ph, W + 2 pw): padded once, kept padded for the backward
        out_channels, _, kh, kw = weight.shape
        n, _, h, w = x.shape
        y = x.new_empty(n, out_channels, h - kh + 1, w - kw + 1)
        b = bias.detach() if bias is not None else x.new_zeros(out_channels)
        _kernels(*weight.shape, h, w)[0](x.numpy(), weight.detach().contiguous().numpy(), b.numpy(), y.numpy())
        ctx.save_for_backward(x)
        ctx.weight_shape, ctx.has_bias = weight.shape, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: (N, O, OH, OW) -> gradients of weight (O, C, KH, KW) and bias (O,)
        (x,) = ctx.saved_tensors
        _, _, h, w = x.shape
        dweight, dbias = x.new_empty(ctx.weight_shape), x.new_empty(ctx.weight_shape[0])
        _kernels(*ctx.weight_shape, h, w)[1](x.numpy(), dy.contiguous().numpy(), dweight.numpy(), dbias.numpy())
        return None, dweight, dbias if ctx.has_bias else None, None


@functools.cache
def _kernels(out_channels: int, in_channels: int, kh: int, kw: int, height: int, width: int):
    """The compiled (forward, weight gradient) loops for one convolution's shapes (of the padded input).

    All shapes are constants of the compiled code: LLVM unrolls the C x KH x KW taps and
    vectorizes the flat loop over output positions around them. Offsets are unsigned, as
    numba's wrap-around check for negative indices keeps LLVM from vectorizing.
    """
    oh, ow = height - kh + 1, width - kw + 1
    # Output positions at the input's pitch, up to the last real one: the last tap of the
    # last position reads the image's last pixel, never past it.
    span = (oh - 1) * width + ow
    plane, taps = height * width, in_channels * kh * kw

    @compiled
    def forward(x, weight, bias, y):  # pragma: no cover - compiled; tested through WideConv2d
        # x: (N, C, H, W); weight: (O, C, KH, KW); bias: (O,); y: (N, O, OH, OW); all contiguous
        n = x.shape[0]
        x, weight, y = x.reshape(-1), weight.reshape(-1), y.reshape(-1)
        wide = np.empty(span, y.dtype)  # one output plane at the input's pitch
        for image in range(n):
            first = np.uint64(image * in_channels * plane)
            for o in range(out_channels):
                for k in range(span):
                    total = bias[o]
                    for c in range(in_channels):
                        for p in range(kh):
                            for q in range(kw):
                                tap = weight[np.uint64(((o * in_channels + c) * kh + p) * kw + q)]
                                total += tap * x[first + np.uint64(c * plane + p * width + q + k)]
                    wide[np.uint64(k)] = total
                out = np.uint64((image * out_channels + o) * oh * ow)
                for i in range(oh):
                    for j in range(ow):
                        y[out + np.uint64(i * ow + j)] = wide[np.uint64(i * width + j)]

    # reassoc (and nsz, which lets a sum start from +0): the sums below run as vector partial sums
    @compiled(fastmath={"reassoc", "nsz", "contract"})
    def weight_grad(x, dy, dweight, dbias):  # pragma: no cover - compiled; tested through WideConv2d
        # x: (N, C, H, W); dy: (N, O, OH, OW); dweight: (O, C, KH, KW); dbias: (O,); all contiguous
        n = x.shape[0]
        x, dy, dweight = x.reshape(-1), dy.reshape(-1), dweight.reshape(-1)
        dweight[:] = 0
        dbias[:] = 0
        wide = np.zeros(span, dy.dtype)  # one output gradient plane at the input's pitch; junk columns stay 0
        for image in range(n):
            first = np.uint64(image * in_channels * plane)
            for o in range(out_channels):
                source = np.uint64((image * out_channels + o) * oh * ow)
                total = dy.dtype.type(0)
                for i in range(oh):
                    for j in range(ow):
                        g = dy[source + np.uint64(i * ow + j)]
                        wide[np.uint64(i * width + j)] = g
                        total += g
                dbias[o] += total
                for t in range(taps):
                    c, p, q = t // (kh * kw), t // kw % kh, t % kw
                    read = first + np.uint64(c * plane + p * width + q)
                    total = dy.dtype.type(0)
                    for k in range(span):
                        total += wide[np.uint64(k)] * x[read + np.uint64(k)]
                    dweight[np.uint64(o * taps + t)] += total

    return forward, weight_grad
