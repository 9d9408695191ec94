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
contiguous loads, which LLVM vectorizes; the columns past the last output of
each row are junk and are dropped (forward) or held at zero (weight gradient).

The max-pool that follows (and the ReLU beside it) runs while each channel's
output is in the L1 cache, so the convolution's output is never written to
memory, nor its gradient built there. For the pool's loops to be flat too,
each image is cut into phases before the convolution: with a pool_h x
pool_w pool, padded pixel (i, j) goes to phase (i % pool_h, j % pool_w) at
(i // pool_h, j // pool_w). The convolution then computes each output phase
(a, r), outputs (n * pool_h + a, m * pool_w + r), as a flat loop over
k = n * pitch + m: its tap (p, q) reads one input phase at k plus a fixed
shift. The pool window at (n, m) holds output phase (a, r) at k in position
a * pool_w + r of row-major order, so the pool is an elementwise maximum of
the phase planes, in that order, with the ties and NaNs of
`cnnlab.fast.tiled_maxpool`; the backward pass gives each phase plane the
pooled gradient where its window's maximum is in that phase, and zero
elsewhere. Without phases, the pool's loops ran over a plane's few windows
per row and stayed scalar, as long as the convolution itself. A pool of
1 x 1 leaves one phase: the plain pitch layout.

What bounds the convolution's loops is loads, not arithmetic, so each load
feeds several sums held in registers. The forward pass computes all pool_h x
pool_w output phases of one channel per position: each weight load feeds
pool_h * pool_w multiply-adds, and the phase loops, inside the loop over
positions, unroll to constant offsets. (Looping over the phases outside it,
with BLOCK output channels per input load instead, left runtime offsets
that LLVM turned into gathers for unpadded images, four times slower.) The
weight gradient computes BLOCK output channels x COLUMNS kernel columns per
position (BLOCK + COLUMNS loads, BLOCK x COLUMNS multiply-adds). Output
channels are padded with zero weights to a multiple of BLOCK, and kernel
columns to a multiple of COLUMNS; their sums are dropped.

The phases of one image sit in a buffer with zero margins (the padding) and
room after its end for the reads past the last output position that whole
vectors and a block of kernel columns make; the buffer stays in the L1 cache,
and nothing is kept between the forward and backward passes but the input and
a byte per pooled output saying where its window's maximum was.

The sums run in another order than oneDNN's, so values and gradients equal
PyTorch's up to float rounding (relative ~1e-6), not bit for bit. The input's
gradient is not computed: this is for a network's first layer, whose input
needs none. Stride 1, no dilation, no groups. Weights and bias are
(O, C, KH, KW) and (O,).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.compiled import compiled
from cnnlab.fast.tiled_maxpool import NO_SWITCH, tiled_max_pool_backward

# Constants of the code, not settings: the weight gradient's inner loop below is written out for
# BLOCK x COLUMNS = 15 sums by name (sum00 .. sum24), which LLVM keeps in registers; changing
# either number means rewriting that loop. 3 x 5 fits LeNet-5's 6 channels and 5-wide kernels.
BLOCK = 3  # output channels per pass of the weight gradient
COLUMNS = 5  # kernel columns per pass of the weight gradient
LANES = 16  # the flat loops' trip counts are multiples of this: whole vectors of 8 floats, unrolled twice


def conv_pool(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int],
    pool: tuple[int, int], relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """y = max_pool2d(conv2d(x, weight, bias, padding=padding), pool), then max(0, y) if `relu`.

    x: (N, C, H, W) float32 or float64 on the CPU; weight: (O, C, KH, KW); bias: (O,) or None.
    Returns (y, switch), both (N, O, OH // PH, OW // PW) with (OH, OW) the convolution's output
    size: switch (uint8) is where in its window each output's maximum was (i * PW + j), NO_SWITCH
    where the ReLU cut it, as `tiled_max_pool` gives it.
    """
    x = x.detach().contiguous()
    out_channels, in_channels, kh, kw = weight.shape
    biases = bias.detach().contiguous() if bias is not None else weight.new_zeros(out_channels)
    (ph, pw), (rows, columns) = padding, x.shape[2:]
    forward = _forward_kernel(out_channels, in_channels, kh, kw, rows, columns, ph, pw, *pool, relu)
    pooled = ((rows + 2 * ph - kh + 1) // pool[0], (columns + 2 * pw - kw + 1) // pool[1])
    y = x.new_empty(len(x), out_channels, *pooled)
    switch = torch.empty(y.shape, dtype=torch.uint8)
    forward(x.numpy(), weight.detach().contiguous().numpy(), biases.numpy(), y.numpy(), switch.numpy())
    return y, switch


def conv_pool_weight_grad(
    x: torch.Tensor, dy: torch.Tensor, switch: torch.Tensor, weight_shape: torch.Size, padding: tuple[int, int],
    pool: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """dL/dweight (O, C, KH, KW) and dL/dbias (O,) of `conv_pool`, from its input x (N, C, H, W),
    the gradient dy of its output and its switch (both (N, O, POH, POW))."""
    x = x.detach().contiguous()
    out_channels, in_channels, kh, kw = weight_shape
    (ph, pw), (rows, columns) = padding, x.shape[2:]
    weight_grad = _weight_grad_kernel(out_channels, in_channels, kh, kw, rows, columns, ph, pw, *pool)
    blocked = math.ceil(out_channels / BLOCK) * BLOCK  # the weight gradient's channels, padded
    dweight = x.new_empty(blocked, in_channels, kh, kw)
    dbias = x.new_empty(blocked)
    weight_grad(x.numpy(), dy.detach().contiguous().numpy(), switch.numpy(), dweight.numpy(), dbias.numpy())
    return dweight[:out_channels], dbias[:out_channels]


def conv_pool_input_grad(
    dy: torch.Tensor, switch: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int], pool: tuple[int, int],
    in_shape: torch.Size,
) -> torch.Tensor:  # fmt: skip
    """dL/dx (N, C, H, W) = `in_shape` of `conv_pool`, for an input that needs one (not a network's first layer).

    The pool's backward pass gives the convolution output's gradient, a transposed convolution
    the input's; with stride 1 no rows or columns are left over. Seldom needed, so not compiled.
    """
    (ph, pw), (kh, kw) = padding, weight.shape[2:]
    conv_shape = (len(dy), weight.shape[0], in_shape[2] + 2 * ph - kh + 1, in_shape[3] + 2 * pw - kw + 1)
    dconv = tiled_max_pool_backward(dy, switch, pool, torch.Size(conv_shape))
    return F.conv_transpose2d(dconv, weight.detach(), None, 1, padding)


@compiled
def _split(x, image, phases, channels, rows, columns, ph, pw, layout):  # pragma: no cover - compiled
    """Image `image` of x (N, C, rows, columns), flat, zero-padded by (ph, pw) and cut into its pool_h x pool_w
    phases, into `phases` (pool_h * pool_w, C, prows, pitch), flat: padded pixel (i, j) goes to phase
    (i % pool_h) * pool_w + j % pool_w, at (i // pool_h, j // pool_w). Margins are left as they are (0).
    layout: as for _read."""
    pool_h, pool_w, plane, prows, pitch = layout
    first = image * channels * rows * columns
    for c in range(channels):
        for i in range(rows):
            row, source = i + ph, first + (c * rows + i) * columns
            for s in range(pool_w):  # padded columns s, s + pool_w, ...
                target = ((row % pool_h) * pool_w + s) * plane + (c * prows + row // pool_h) * pitch
                m = (pw - s + pool_w - 1) // pool_w  # the first of them inside the image
                j = s + m * pool_w - pw
                while j < columns:
                    phases[np.uint64(target + m)] = x[np.uint64(source + j)]
                    m += 1
                    j += pool_w


@compiled
def _read(a, r, c, p, q, layout):  # pragma: no cover - compiled; tested through conv_pool
    """Where output phase (a, r)'s tap (c, p, q) reads the input's phases, relative to the output position.

    layout: (pool_h, pool_w, the size of one input phase, its rows, its columns)."""
    pool_h, pool_w, plane, prows, pitch = layout
    row, column = a + p, r + q
    return (row % pool_h * pool_w + column % pool_w) * plane + (c * prows + row // pool_h) * pitch + column // pool_w


class Geometry(NamedTuple):
    """Where one convolution's phases, positions and reads lie; see `_geometry`."""

    poh: int  # pooled output rows
    pow_: int  # pooled output columns
    count: int  # phases, and positions in a pool window
    layout: tuple[int, int, int, int, int]  # (pool_h, pool_w, plane, prows, pitch), for _split and _read
    plane: int  # one phase of the padded input: C x prows x pitch
    pitch: int  # a phase plane's columns
    span: int  # positions computed per output phase, a multiple of LANES
    taps: int  # C x KH x KW
    margin: int  # room after the last phase plane for the reads past the last position


@functools.cache
def _geometry(
    in_channels: int, kh: int, kw: int, rows: int, columns: int, ph: int, pw: int, pool_h: int, pool_w: int
) -> Geometry:
    height, width = rows + 2 * ph, columns + 2 * pw  # of the padded input
    poh, pow_ = (height - kh + 1) // pool_h, (width - kw + 1) // pool_w  # the pooled output
    prows, pitch = -(-height // pool_h), -(-width // pool_w)  # a phase plane's rows and columns
    plane = in_channels * prows * pitch
    # A pooled plane's positions at the phases' pitch, up to the last real one. Output phase
    # (a, r) at k = n * pitch + m is convolution output (n * pool_h + a, m * pool_w + r): its
    # tap (p, q) reads input phase ((a + p) % pool_h, (r + q) % pool_w) at k, shifted by
    # (a + p) // pool_h rows and (r + q) // pool_w columns; the last reads stay in the plane.
    # Rounded up to whole vectors, so that no position runs in a scalar remainder loop (which took
    # a fifth of the time at LeNet-5's 222 positions); the positions past the last are junk too.
    span = -(-((poh - 1) * pitch + pow_) // LANES) * LANES
    # Past the last phase plane, the rounded span and a block of COLUMNS kernel columns read this far.
    margin = pitch + COLUMNS + LANES
    layout = (pool_h, pool_w, plane, prows, pitch)
    return Geometry(poh, pow_, pool_h * pool_w, layout, plane, pitch, span, in_channels * kh * kw, margin)


# How the loops below are made fast: all shapes are constants of the compiled code (each
# factory reads them into local names, which numba freezes into the machine code), so LLVM
# unrolls the C x KH x KW taps and vectorizes the flat loop over output positions around
# them. Offsets are unsigned, as numba's wrap-around check for negative indices keeps LLVM
# from vectorizing. The sums run as vector partial sums (fastmath's reassociation).
FASTMATH = {"reassoc", "nsz", "contract"}


@functools.cache
def _forward_kernel(
    out_channels: int, in_channels: int, kh: int, kw: int, rows: int, columns: int, ph: int, pw: int,
    pool_h: int, pool_w: int, relu: bool,
):  # fmt: skip
    """The compiled forward loops for one convolution's shapes, padding, pool and ReLU."""
    poh, pow_, count, layout, plane, pitch, span, taps, margin = _geometry(
        in_channels, kh, kw, rows, columns, ph, pw, pool_h, pool_w
    )

    @compiled(fastmath=FASTMATH)
    def forward(x, weight, bias, y, switch):  # pragma: no cover - compiled; tested through conv_pool
        # x: (N, C, rows, columns); weight: (O, C, KH, KW); bias: (O,); y, switch: (N, O, POH, POW)
        n = x.shape[0]
        x, weight, y, switch = x.reshape(-1), weight.reshape(-1), y.reshape(-1), switch.reshape(-1)
        phases = np.zeros(count * plane + margin, x.dtype)
        wide = np.empty(count * span, y.dtype)  # one channel's output phases: (count, span)
        pooled = np.empty(span, y.dtype)  # its pooled plane at the phases' pitch
        chosen = np.empty(span, np.uint8)  # and switches
        zero = y.dtype.type(0)
        for image in range(n):
            _split(x, image, phases, in_channels, rows, columns, ph, pw, layout)
            for o in range(out_channels):
                for k in range(span):
                    for a in range(pool_h):
                        for r in range(pool_w):
                            total = bias[o]
                            for c in range(in_channels):
                                for p in range(kh):
                                    for q in range(kw):
                                        tap = (c * kh + p) * kw + q
                                        value = phases[np.uint64(_read(a, r, c, p, q, layout) + k)]
                                        total += weight[np.uint64(o * taps + tap)] * value
                            wide[np.uint64((a * pool_w + r) * span + k)] = total
                # The pool: the phases in order are a window's positions in row-major order. As in
                # tiled_maxpool, a position replaces the best so far when it is larger or NaN, so
                # the first of equal maxima wins and the last NaN.
                for k in range(span):
                    best, where = wide[np.uint64(k)], np.uint8(0)
                    for phase in range(1, count):
                        v = wide[np.uint64(phase * span + k)]
                        take = (v > best) | (v != v)
                        best = v if take else best
                        where = np.uint8(phase) if take else where
                    cut = relu & ~((best > 0) | (best != best))  # the ReLU: no gradient through <= 0
                    pooled[np.uint64(k)] = zero if cut else best
                    chosen[np.uint64(k)] = np.uint8(NO_SWITCH) if cut else where
                out = np.uint64((image * out_channels + o) * poh * pow_)
                for row in range(poh):
                    for m in range(pow_):
                        at = np.uint64(row * pitch + m)
                        y[out + np.uint64(row * pow_ + m)] = pooled[at]
                        switch[out + np.uint64(row * pow_ + m)] = chosen[at]

    return forward


@functools.cache
def _weight_grad_kernel(
    out_channels: int, in_channels: int, kh: int, kw: int, rows: int, columns: int, ph: int, pw: int,
    pool_h: int, pool_w: int,
):  # fmt: skip
    """The compiled weight and bias gradient loops for one convolution's shapes, padding and pool."""
    poh, pow_, count, layout, plane, pitch, span, taps, margin = _geometry(
        in_channels, kh, kw, rows, columns, ph, pw, pool_h, pool_w
    )

    @compiled(fastmath=FASTMATH)
    def weight_grad(x, dy, switch, dweight, dbias):  # pragma: no cover - compiled; tested through conv_pool
        # x: (N, C, rows, columns); dy, switch: (N, O, POH, POW); dweight: (O rounded up to BLOCK, C, KH, KW);
        # dbias: (O rounded up,)
        n = x.shape[0]
        x, dy, switch, dweight = x.reshape(-1), dy.reshape(-1), switch.reshape(-1), dweight.reshape(-1)
        phases = np.zeros(count * plane + margin, x.dtype)
        dweight[:] = 0
        dbias[:] = 0
        # One channel's pooled gradient and switches at the phases' pitch; the columns past the
        # last window keep NO_SWITCH, so they send nothing back.
        spread = np.zeros(span, dy.dtype)
        chosen = np.full(span, NO_SWITCH, np.uint8)
        # A block's convolution-output gradient, by phase: (BLOCK, count, span). Each pooled
        # gradient goes to the phase its window's maximum is in, 0 to the others. The planes of
        # channels past O are never written and stay 0, so they add nothing to the sums.
        wide = np.zeros(BLOCK * count * span, dy.dtype)
        zero = dy.dtype.type(0)
        for image in range(n):
            _split(x, image, phases, in_channels, rows, columns, ph, pw, layout)
            for block in range(0, out_channels, BLOCK):
                for b in range(min(BLOCK, out_channels - block)):
                    source = np.uint64((image * out_channels + block + b) * poh * pow_)
                    total = zero
                    for row in range(poh):
                        for m in range(pow_):
                            o = source + np.uint64(row * pow_ + m)
                            at = np.uint64(row * pitch + m)
                            spread[at], chosen[at] = dy[o], switch[o]
                            total += dy[o] if switch[o] != np.uint8(NO_SWITCH) else zero
                    dbias[block + b] += total
                    for phase in range(count):
                        start = np.uint64((b * count + phase) * span)
                        for k in range(span):
                            hit = chosen[np.uint64(k)] == np.uint8(phase)
                            wide[start + np.uint64(k)] = spread[np.uint64(k)] if hit else zero
                for a in range(pool_h):
                    for r in range(pool_w):
                        s0 = np.uint64((a * pool_w + r) * span)  # the block's three gradient planes
                        s1, s2 = s0 + np.uint64(count * span), s0 + np.uint64(2 * count * span)
                        for c in range(in_channels):
                            for p in range(kh):
                                for q in range(0, kw, COLUMNS):
                                    r0, r1 = _read(a, r, c, p, q, layout), _read(a, r, c, p, q + 1, layout)
                                    r2, r3 = _read(a, r, c, p, q + 2, layout), _read(a, r, c, p, q + 3, layout)
                                    r4 = _read(a, r, c, p, q + 4, layout)
                                    # sum_bj: output channel block + b, kernel column q + j
                                    sum00 = sum01 = sum02 = sum03 = sum04 = dy.dtype.type(0)
                                    sum10 = sum11 = sum12 = sum13 = sum14 = dy.dtype.type(0)
                                    sum20 = sum21 = sum22 = sum23 = sum24 = dy.dtype.type(0)
                                    for k in range(span):
                                        at = np.uint64(k)
                                        g0, g1, g2 = wide[s0 + at], wide[s1 + at], wide[s2 + at]
                                        v0, v1 = phases[np.uint64(r0) + at], phases[np.uint64(r1) + at]
                                        v2, v3 = phases[np.uint64(r2) + at], phases[np.uint64(r3) + at]
                                        v4 = phases[np.uint64(r4) + at]
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

    return weight_grad
