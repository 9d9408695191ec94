"""A convolution with few input channels (LeNet-5's first) and the max-pool after it, as compiled loops.

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

What bounds such a loop is loads, not arithmetic, so each load feeds several
sums held in registers: the forward pass computes BLOCK output channels at a
time (one input load, BLOCK multiply-adds), the weight gradient BLOCK output
channels x COLUMNS kernel columns (BLOCK + COLUMNS loads, BLOCK x COLUMNS
multiply-adds). Output channels are padded with zero weights to a multiple of
BLOCK, and kernel columns to a multiple of COLUMNS; their sums are dropped.

The max-pool that follows the convolution (and the ReLU beside it) runs on
each block's output planes while they are in the L1 cache, with the windows,
ties and NaNs of `cnnlab.backprop.tiled_maxpool`: the convolution's output is
never written to memory, and its gradient is never built there either. The
backward pass spreads each pooled gradient to its window's maximum straight
into the planes the weight gradient reads. A pool of 1 x 1 without the ReLU
leaves the convolution alone.

Each image is copied into a buffer with zero margins (the padding) and
COLUMNS - 1 zeros after its end, which a block of columns past the kernel's
last may read; the loops read the buffer, which stays in the L1 cache, and
nothing padded is kept between the forward and backward passes.

The sums run in another order than oneDNN's, so values and gradients equal
PyTorch's up to float rounding (relative ~1e-6), not bit for bit. The input's
gradient is not computed: this is for a network's first layer, whose input
needs none. Stride 1, no dilation, no groups. Weights and bias are
(O, C, KH, KW) and (O,).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from cnnlab.backprop.tiled_maxpool import NO_SWITCH
from cnnlab.compiled import compiled

BLOCK = 3  # output channels per pass
COLUMNS = 5  # kernel columns per pass of the weight gradient (LeNet-5's kernels are 5 wide)


class WideConv2d(torch.autograd.Function):
    """y = max_pool2d(conv2d(x, weight, bias, padding=padding), pool), then max(0, y) if `relu`, for an x
    that needs no gradient; windows that tile the convolution's output; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, pool, relu):  # x: (N, C, H, W) -> (N, O, OH // PH, OW // PW)
        x = x.detach().contiguous()
        out_channels, in_channels, kh, kw = weight.shape
        blocked = math.ceil(out_channels / BLOCK) * BLOCK
        weights = weight.new_zeros(blocked, in_channels, kh, kw)  # (O rounded up to BLOCK, C, KH, KW)
        weights[:out_channels] = weight.detach()
        biases = weight.new_zeros(blocked)
        if bias is not None:
            biases[:out_channels] = bias.detach()
        (ph, pw), (rows, columns) = padding, x.shape[2:]
        kernels = _kernels(out_channels, in_channels, kh, kw, rows, columns, ph, pw, *pool, relu)
        pooled = ((rows + 2 * ph - kh + 1) // pool[0], (columns + 2 * pw - kw + 1) // pool[1])
        y = x.new_empty(len(x), out_channels, *pooled)
        switch = torch.empty(y.shape, dtype=torch.uint8)  # which position of its window each output is
        kernels[0](x.numpy(), weights.numpy(), biases.numpy(), y.numpy(), switch.numpy())
        ctx.save_for_backward(x, switch)
        ctx.blocked, ctx.has_bias, ctx.kernels, ctx.weight_shape = blocked, bias is not None, kernels, weight.shape
        return y

    @staticmethod
    def backward(ctx, dy):  # dy: (N, O, POH, POW) -> gradients of weight (O, C, KH, KW) and bias (O,)
        x, switch = ctx.saved_tensors
        out_channels, in_channels, kh, kw = ctx.weight_shape
        dweight = x.new_empty(ctx.blocked, in_channels, kh, kw)
        dbias = x.new_empty(ctx.blocked)
        ctx.kernels[1](x.numpy(), dy.contiguous().numpy(), switch.numpy(), dweight.numpy(), dbias.numpy())
        return None, dweight[:out_channels], dbias[:out_channels] if ctx.has_bias else None, None, None, None


@compiled
def _pad(x, image, padded, channels, rows, columns, ph, pw):  # pragma: no cover - compiled; tested through WideConv2d
    """Image `image` of x (N, C, rows, columns), flat, into `padded` (C, rows + 2 ph, columns + 2 pw), flat,
    inside its margins, which are left as they are (0)."""
    height, width = rows + 2 * ph, columns + 2 * pw
    first = np.uint64(image * channels * rows * columns)
    for c in range(channels):
        for i in range(rows):
            source = first + np.uint64((c * rows + i) * columns)
            target = np.uint64((c * height + i + ph) * width + pw)
            for j in range(columns):
                padded[target + np.uint64(j)] = x[source + np.uint64(j)]


@functools.cache
def _kernels(
    out_channels: int, in_channels: int, kh: int, kw: int, rows: int, columns: int, ph: int, pw: int,
    pool_h: int, pool_w: int, relu: bool,
):  # fmt: skip
    """The compiled (forward, weight gradient) loops for one convolution's shapes, padding and pool.

    All shapes are constants of the compiled code: LLVM unrolls the C x KH x KW taps and
    vectorizes the flat loop over output positions around them. Offsets are unsigned, as
    numba's wrap-around check for negative indices keeps LLVM from vectorizing.
    """
    height, width = rows + 2 * ph, columns + 2 * pw  # of the padded input
    oh, ow = height - kh + 1, width - kw + 1
    # Output positions at the input's pitch, up to the last real one: the last tap of the
    # last position reads the image's last pixel, never past it.
    span = (oh - 1) * width + ow
    plane, taps = height * width, in_channels * kh * kw
    poh, pow_ = oh // pool_h, ow // pool_w  # the pooled output
    covered = pow_ * pool_w  # the columns of a plane the windows cover
    s1, s2 = np.uint64(span), np.uint64(2 * span)  # where a block's second and third planes start
    # reassoc (and nsz, which lets a sum start from +0): the sums run as vector partial sums
    fast = {"reassoc", "nsz", "contract"}

    @compiled(fastmath=fast)
    def forward(x, weight, bias, y, switch):  # pragma: no cover - compiled; tested through WideConv2d
        # x: (N, C, rows, columns); weight: (O rounded up to BLOCK, C, KH, KW); bias: (O rounded up,);
        # y, switch: (N, O, POH, POW)
        n = x.shape[0]
        x, weight, y, switch = x.reshape(-1), weight.reshape(-1), y.reshape(-1), switch.reshape(-1)
        padded = np.zeros(in_channels * plane + COLUMNS - 1, x.dtype)
        wide = np.empty(BLOCK * span, y.dtype)  # a block's output planes at the input's pitch
        column_max = np.empty(covered, y.dtype)  # one band of pool_h rows, reduced to column maxima
        column_row = np.empty(covered, np.uint8)  # the row (times pool_w) of each column's maximum
        zero = y.dtype.type(0)
        for image in range(n):
            _pad(x, image, padded, in_channels, rows, columns, ph, pw)
            for block in range(0, out_channels, BLOCK):
                for k in range(span):
                    total0, total1, total2 = bias[block], bias[block + 1], bias[block + 2]
                    for c in range(in_channels):
                        for p in range(kh):
                            for q in range(kw):
                                tap = (c * kh + p) * kw + q
                                value = padded[np.uint64(c * plane + p * width + q + k)]
                                total0 += weight[np.uint64(block * taps + tap)] * value
                                total1 += weight[np.uint64((block + 1) * taps + tap)] * value
                                total2 += weight[np.uint64((block + 2) * taps + tap)] * value
                    at = np.uint64(k)
                    wide[at], wide[s1 + at], wide[s2 + at] = total0, total1, total2
                # The pool, as tiled_maxpool's two passes: a position replaces the best so far
                # when it is larger or NaN, so the first of equal maxima wins and the last NaN.
                for b in range(min(BLOCK, out_channels - block)):
                    out = np.uint64((image * out_channels + block + b) * poh * pow_)
                    for band in range(poh):
                        first = np.uint64(b * span + band * pool_h * width)
                        for j in range(covered):
                            best, where = wide[first + np.uint64(j)], np.uint8(0)
                            for a in range(1, pool_h):
                                v = wide[first + np.uint64(a * width + j)]
                                take = (v > best) | (v != v)
                                best = v if take else best
                                where = np.uint8(a * pool_w) if take else where
                            column_max[np.uint64(j)] = best
                            column_row[np.uint64(j)] = where
                        for window in range(pow_):
                            at = np.uint64(window * pool_w)
                            best, where = column_max[at], column_row[at]
                            for c in range(1, pool_w):
                                v, place = column_max[at + np.uint64(c)], column_row[at + np.uint64(c)] + np.uint8(c)
                                later_nan = (v != v) & ((best == best) | (place > where))
                                take = later_nan | (v > best) | ((v == best) & (place < where))
                                best = v if take else best
                                where = place if take else where
                            cut = relu & ~((best > 0) | (best != best))  # the ReLU: no gradient through <= 0
                            o = out + np.uint64(band * pow_ + window)
                            y[o] = zero if cut else best
                            switch[o] = np.uint8(NO_SWITCH) if cut else where

    @compiled(fastmath=fast)
    def weight_grad(x, dy, switch, dweight, dbias):  # pragma: no cover - compiled; tested through WideConv2d
        # x: (N, C, rows, columns); dy, switch: (N, O, POH, POW); dweight: (O rounded up to BLOCK, C, KH, KW);
        # dbias: (O rounded up,)
        n = x.shape[0]
        x, dy, switch, dweight = x.reshape(-1), dy.reshape(-1), switch.reshape(-1), dweight.reshape(-1)
        padded = np.zeros(in_channels * plane + COLUMNS - 1, x.dtype)
        dweight[:] = 0
        dbias[:] = 0
        # A block's convolution-output gradient planes at the input's pitch: each pooled gradient
        # at its window's maximum, 0 elsewhere (junk columns included). The planes of channels
        # past O are never written and stay 0, so they add nothing to the sums.
        wide = np.zeros(BLOCK * span, dy.dtype)
        zero = dy.dtype.type(0)
        for image in range(n):
            _pad(x, image, padded, in_channels, rows, columns, ph, pw)
            for block in range(0, out_channels, BLOCK):
                for b in range(min(BLOCK, out_channels - block)):
                    start = np.uint64(b * span)
                    for k in range(span):
                        wide[start + np.uint64(k)] = zero
                    source = np.uint64((image * out_channels + block + b) * poh * pow_)
                    total = zero
                    for band in range(poh):
                        for window in range(pow_):
                            o = source + np.uint64(band * pow_ + window)
                            s = switch[o]
                            if s != np.uint8(NO_SWITCH):
                                i, j = band * pool_h + s // np.uint8(pool_w), window * pool_w + s % np.uint8(pool_w)
                                wide[start + np.uint64(i * width + j)] = dy[o]
                                total += dy[o]
                    dbias[block + b] += total
                for c in range(in_channels):
                    for p in range(kh):
                        for q in range(0, kw, COLUMNS):
                            read = np.uint64(c * plane + p * width + q)
                            # sum_bj: output channel block + b, kernel column q + j
                            sum00 = sum01 = sum02 = sum03 = sum04 = dy.dtype.type(0)
                            sum10 = sum11 = sum12 = sum13 = sum14 = dy.dtype.type(0)
                            sum20 = sum21 = sum22 = sum23 = sum24 = dy.dtype.type(0)
                            for k in range(span):
                                g0, g1, g2 = wide[np.uint64(k)], wide[s1 + np.uint64(k)], wide[s2 + np.uint64(k)]
                                at = read + np.uint64(k)
                                v0, v1, v2 = padded[at], padded[at + np.uint64(1)], padded[at + np.uint64(2)]
                                v3, v4 = padded[at + np.uint64(3)], padded[at + np.uint64(4)]
                                sum00 += g0 * v0
                                sum01 += g0 * v1
                                sum02 += g0 * v2
                                sum03 += g0 * v3
                                sum04 += g0 * v4
                                sum10 += g1 * v0
                                sum11 += g1 * v1
                                sum12 += g1 * v2
                                sum13 += g1 * v3
                                sum14 += g1 * v4
                                sum20 += g2 * v0
                                sum21 += g2 * v1
                                sum22 += g2 * v2
                                sum23 += g2 * v3
                                sum24 += g2 * v4
                            sums = (sum00, sum01, sum02, sum03, sum04, sum10, sum11, sum12, sum13, sum14,
                                    sum20, sum21, sum22, sum23, sum24)  # fmt: skip
                            for b in range(BLOCK):
                                for j in range(min(COLUMNS, kw - q)):
                                    tap = (c * kh + p) * kw + q + j
                                    dweight[np.uint64((block + b) * taps + tap)] += sums[b * COLUMNS + j]

    return forward, weight_grad
