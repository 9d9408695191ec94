"""Max-pooling over windows that tile the image, optionally fused with a ReLU, as compiled loops.

The pools of LeNet-5 and the CIFAR nets (2x2, stride 2) cut each (H, W) plane
into disjoint windows. For those, the forward pass lays the windows' positions
out as planes (one strided copy), then one flat pass finds every window's
maximum and remembers which of its positions held it (the "switch", a byte
per output); the backward pass writes each input's gradient exactly once: the
output's gradient where the switch points, zero elsewhere. PyTorch's CPU
kernels do the same work in three passes (max with int64 indices, zero-fill,
scatter) and are slowest at few channels: on LeNet-5's first pool (batch 128,
6 x 24 x 24) they take 1.3-1.8 ms forward + backward, this module 0.5 ms
(`python bench/fastpath.py`).

`relu=True` also applies the ReLU, which commutes with max-pooling: the output
is max(0, window maximum), and a window whose maximum is <= 0 sends no
gradient back (switch = NO_SWITCH), exactly what ReLU's backward does. NaN
propagates as in torch: a NaN wins its window and passes the ReLU.

Ties go to the first maximum, row by row, as in torch. Rows and columns that
no window covers (an odd size in floor mode) get zero gradient.
"""

from __future__ import annotations

import functools

import torch

from cnnlab.compiled import compiled

NO_SWITCH = 255  # the switch of a window that passes no gradient (its maximum was cut by the ReLU)


def tiled_max_pool(x: torch.Tensor, kernel: tuple[int, int], relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) float on the CPU -> (y, switch), both (N, C, H // kh, W // kw).

    y = max over each kh x kw window (then max(0, .) if `relu`); switch (uint8) = the
    window position i * kw + j of the maximum, NO_SWITCH where no gradient flows.
    """
    x = x.detach()
    (kh, kw), (n, c, h, w) = kernel, x.shape
    oh, ow = h // kh, w // kw
    # (kh * kw, N * C * OH * OW): plane k holds position k of every window. One strided copy
    # (PyTorch's, multithreaded) makes the selection below a flat loop over long contiguous
    # rows, which LLVM vectorizes whatever the CPU; a loop over each image row's few windows
    # (12 for LeNet-5's first pool) stayed scalar and branchy on some CPUs and ran 8x slower.
    windows = x[:, :, : oh * kh, : ow * kw].view(n, c, oh, kh, ow, kw)
    positions = windows.permute(3, 5, 0, 1, 2, 4).contiguous()  # (kh, kw, N, C, OH, OW)
    y = x.new_empty(n, c, oh, ow)
    switch = torch.empty(y.shape, dtype=torch.uint8)
    _kernels(kh, kw)[0](positions.view(kh * kw, -1).numpy(), relu, y.view(-1).numpy(), switch.view(-1).numpy())
    return y, switch


def tiled_max_pool_backward(
    dout: torch.Tensor, switch: torch.Tensor, kernel: tuple[int, int], in_shape: torch.Size
) -> torch.Tensor:
    """dout, switch: (N, C, OH, OW) -> dx: (N, C, H, W) = `in_shape`."""
    dout = dout.detach().contiguous()
    dx = dout.new_empty(in_shape)
    _kernels(*kernel)[1](dout.numpy(), switch.numpy(), dx.numpy())
    return dx


@functools.cache
def _kernels(kh: int, kw: int):
    """The compiled (forward, backward) loops for kh x kw windows.

    The window size is a constant of the compiled code, not an argument: with it fixed,
    LLVM unrolls the window loops and vectorizes the loop around them. With `cache=True`
    the machine code is kept on disk per window size, so only the first use on a machine
    pays the compilation (~1 s per kernel).

    The loops run on the calling thread. numba's parallel loops would halve the ~0.3 ms a
    LeNet-5 step (batch 128) spends in them, but their worker threads spin between calls,
    taking a core from PyTorch's own threads for the rest of the step; serial loops also
    leave the kernels safe to call from several threads at once (nogil).
    """

    @compiled
    def forward(positions, relu, y, switch):  # pragma: no cover - compiled; tested through its callers
        # positions: (kh * kw, M) window positions in row-major order; y, switch: (M,)
        for o in range(y.size):
            best = positions[0, o]
            where = 0
            for k in range(1, kh * kw):
                v = positions[k, o]
                # Selects, not branches: the first maximum wins, a NaN wins over numbers (as in torch).
                take = (v > best) | ((v != v) & (best == best))
                best = v if take else best
                where = k if take else where
            cut = relu & ~((best > 0) | (best != best))  # the ReLU: no gradient through a maximum <= 0
            y[o] = 0 if cut else best
            switch[o] = NO_SWITCH if cut else where

    @compiled
    def backward(dout, switch, dx):  # pragma: no cover - compiled; tested through its callers
        n, c, h, w = dx.shape
        _, _, oh, ow = dout.shape
        for plane in range(n * c):
            i, j = plane // c, plane % c
            for p in range(oh):
                for q in range(ow):
                    g, where = dout[i, j, p, q], switch[i, j, p, q]
                    for a in range(kh):
                        for b in range(kw):
                            dx[i, j, p * kh + a, q * kw + b] = g if where == a * kw + b else 0.0
            # Rows and columns past the last window (odd sizes in floor mode) took part in nothing.
            for r in range(oh * kh, h):
                dx[i, j, r, :] = 0.0
            for r in range(oh * kh):
                dx[i, j, r, ow * kw :] = 0.0

    return forward, backward
