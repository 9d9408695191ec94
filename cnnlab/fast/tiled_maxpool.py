"""Max-pooling over windows that tile the image, optionally fused with a ReLU, as compiled loops.

The pools of LeNet-5 and the CIFAR nets (2x2, stride 2) cut each (H, W) plane
into disjoint windows. For those, the forward pass takes two flat passes: the
first reduces each band of kh rows to one row of column maxima (remembering
which row held each), the second reduces each kw columns of those to the
window's maximum, and records which of the window's positions held it (the
"switch", a byte per output). The backward pass undoes the two steps: it
spreads each output's gradient over its window's columns, then over its rows,
writing each input's gradient exactly once: the output's gradient where the
switch points, zero elsewhere. PyTorch's CPU kernels take three passes (max
with int64 indices, zero-fill, scatter) and are slowest at few channels: on
LeNet-5's first pool (192 images, 6 x 24 x 24, one thread) its forward pass
takes ~7 ms, this module's 0.4 ms, and 0.5 ms for the backward pass.

`relu=True` also applies the ReLU, which commutes with max-pooling: the output
is max(0, window maximum), and a window whose maximum is <= 0 sends no
gradient back (switch = NO_SWITCH), exactly what ReLU's backward does. NaN
propagates as in torch: a NaN wins its window (of several, the last in
row-major order, as in torch's CPU kernel) and passes the ReLU.

Ties go to the first maximum in row-major order, as in torch. Rows and columns
that no window covers (an odd size in floor mode) get zero gradient.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from cnnlab.compiled import compiled

NO_SWITCH = 255  # the switch of a window that passes no gradient (its maximum was cut by the ReLU)


def tiles(
    kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
    ceil_mode: bool,
) -> bool:  # fmt: skip
    """Whether a max-pool's windows are disjoint tiles, which these loops compute: stride = kernel, no
    padding or dilation, floor mode, and fewer than NO_SWITCH positions per window (a byte says which won)."""
    return (stride == kernel and padding == (0, 0) and dilation == (1, 1) and not ceil_mode
            and kernel[0] * kernel[1] < NO_SWITCH)  # fmt: skip


def tiled_max_pool(x: torch.Tensor, kernel: tuple[int, int], relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) float on the CPU -> (y, switch), both (N, C, H // kh, W // kw).

    y = max over each kh x kw window (then max(0, .) if `relu`); switch (uint8) = the
    window position i * kw + j of the maximum, NO_SWITCH where no gradient flows.
    """
    x = x.detach().contiguous()
    (kh, kw), (n, c, h, w) = kernel, x.shape
    y = x.new_empty(n, c, h // kh, w // kw)
    switch = torch.empty(y.shape, dtype=torch.uint8)
    _forward_kernel(kh, kw)(x.numpy(), relu, y.numpy(), switch.numpy())
    return y, switch


def tiled_max_pool_backward(
    dout: torch.Tensor, switch: torch.Tensor, kernel: tuple[int, int], in_shape: torch.Size
) -> torch.Tensor:
    """dout, switch: (N, C, OH, OW) -> dx: (N, C, H, W) = `in_shape`."""
    dout = dout.detach().contiguous()
    dx = dout.new_empty(in_shape)
    _backward_kernel(*kernel)(dout.numpy(), switch.contiguous().numpy(), dx.numpy())
    return dx


# How the loops below are made fast. The window size is a constant of the compiled code, not an
# argument: with it fixed, LLVM unrolls the window loops and vectorizes the loops around them. Each pass runs over
# long rows of contiguous memory (LeNet-5's first pool: rows of 24 columns, then one flat
# loop over every window); a loop over each row's few windows (12) stayed scalar.
#
# Offsets are unsigned: numba wraps a negative signed index around the array's end, a
# check per access that keeps LLVM from vectorizing (these loops ran 3x slower).
#
# The loops run on the calling thread. numba's parallel loops would halve their time, but
# their worker threads spin between calls, taking a core from PyTorch's own threads for
# the rest of the step; serial loops also leave the kernels safe to call from several
# threads at once (nogil).


@functools.cache
def _forward_kernel(kh: int, kw: int):
    """The compiled forward loops for kh x kw windows: (x, relu, y, switch) -> None, filling y and switch."""

    @compiled
    def forward(x, relu, y, switch):  # pragma: no cover - compiled; tested through its callers
        # x: (N, C, H, W); y, switch: (N, C, OH, OW); all contiguous
        _, _, h, w = x.shape
        bands, oh, ow = y.shape[0] * y.shape[1] * y.shape[2], y.shape[2], y.shape[3]
        width = ow * kw  # the columns windows cover
        zero = np.zeros(1, y.dtype)[0]
        x, y, switch = x.reshape(-1), y.reshape(-1), switch.reshape(-1)
        # Pass 1: each band of kh rows -> one row of `width` column maxima, and the row
        # (times kw) that held each. As in torch, a position replaces the best so far when
        # it is larger or NaN: the first of equal maxima wins, and the last of several NaNs.
        column_max = np.empty(bands * width, x.dtype)
        column_row = np.empty(bands * width, np.uint8)
        for band in range(bands):
            plane, row = band // oh, band % oh * kh
            first = np.uint64((plane * h + row) * w)
            out = np.uint64(band * width)
            for j in range(width):
                best, where = x[first + np.uint64(j)], np.uint8(0)
                for a in range(1, kh):
                    v = x[first + np.uint64(a * w + j)]
                    take = (v > best) | (v != v)  # selects, not branches
                    best = v if take else best
                    where = np.uint8(a * kw) if take else where
                column_max[out + np.uint64(j)] = best
                column_row[out + np.uint64(j)] = where
        # Pass 2: each kw consecutive column maxima -> the window's maximum, chosen as a scan
        # of the window in row-major order would: of equal maxima the first position in that
        # order, of NaNs the last.
        for o in range(bands * ow):
            first = np.uint64(o * kw)
            best, where = column_max[first], column_row[first]
            for b in range(1, kw):
                v, at = column_max[first + np.uint64(b)], column_row[first + np.uint64(b)] + np.uint8(b)
                later_nan = (v != v) & ((best == best) | (at > where))
                take = later_nan | (v > best) | ((v == best) & (at < where))
                best = v if take else best
                where = at if take else where
            cut = relu & ~((best > 0) | (best != best))  # the ReLU: no gradient through a maximum <= 0
            y[np.uint64(o)] = zero if cut else best
            switch[np.uint64(o)] = np.uint8(NO_SWITCH) if cut else where

    return forward


@functools.cache
def _backward_kernel(kh: int, kw: int):
    """The compiled backward loops for kh x kw windows: (dout, switch, dx) -> None, filling dx."""

    @compiled
    def backward(dout, switch, dx):  # pragma: no cover - compiled; tested through its callers
        # dout, switch: (N, C, OH, OW); dx: (N, C, H, W); all contiguous
        _, _, h, w = dx.shape
        planes, oh, ow = dout.shape[0] * dout.shape[1], dout.shape[2], dout.shape[3]
        bands, width = planes * oh, ow * kw
        zero = np.zeros(1, dx.dtype)[0]
        dout, switch, dx = dout.reshape(-1), switch.reshape(-1), dx.reshape(-1)
        # Pass 1: each output's gradient to its maximum's column (zero in the others), with
        # the switch beside it: (bands, width).
        column_grad = np.empty(bands * width, dx.dtype)
        column_switch = np.empty(bands * width, np.uint8)
        for o in range(bands * ow):
            g, s = dout[np.uint64(o)], switch[np.uint64(o)]
            column = s % np.uint8(kw) if s != np.uint8(NO_SWITCH) else np.uint8(kw)  # kw: no column
            for b in range(kw):
                column_grad[np.uint64(o * kw + b)] = g if column == np.uint8(b) else zero
                column_switch[np.uint64(o * kw + b)] = s
        # Pass 2: each column's gradient to the row of its band that held the maximum.
        for band in range(bands):
            plane, row = band // oh, band % oh * kh
            first = np.uint64((plane * h + row) * w)
            source = np.uint64(band * width)
            for a in range(kh):
                out = first + np.uint64(a * w)
                for j in range(width):
                    s = column_switch[source + np.uint64(j)]
                    hit = (s != np.uint8(NO_SWITCH)) & (s // np.uint8(kw) == np.uint8(a))
                    dx[out + np.uint64(j)] = column_grad[source + np.uint64(j)] if hit else zero
                for j in range(width, w):  # columns past the last window took part in nothing
                    dx[out + np.uint64(j)] = zero
        # Rows past the last window (an odd height in floor mode) took part in nothing either.
        for plane in range(planes):
            for i in range(oh * kh * w, h * w):
                dx[np.uint64(plane * h * w + i)] = zero

    return backward
