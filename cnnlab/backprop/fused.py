"""Hand-written layers that run several modules as one of cnnlab's compiled kernels (`cnnlab.fast`).

`Sequential.from_torch(model, fast=True)` builds these where `cnnlab.fast.plan`
says a kernel fits; the math is that of the layers they replace (pool.py,
activations.py, conv.py), so `tests/backprop/test_fused.py` checks each
against them:

- `TiledMaxPool`: a max-pool whose windows tile the image, and the ReLU beside
  it when there is one. relu(maxpool(x)) = maxpool(relu(x)); the gradient goes
  to the window's first maximum, and nowhere when that is <= 0 (the "switch"
  is one byte per output).
- `ConvPool`: a one-channel convolution, then such a pool. Forward and the
  weight and bias gradients are compiled loops; dx, needed only when this is
  not the network's first layer, is the pool's backward and a transposed
  convolution.
"""

from __future__ import annotations

import torch

from cnnlab.backprop.layer import Layer
from cnnlab.fast.conv_pool import conv_pool, conv_pool_input_grad, conv_pool_weight_grad
from cnnlab.fast.plan import ConvPool as ConvPoolStep
from cnnlab.fast.plan import TiledPool as TiledPoolStep
from cnnlab.fast.tiled_maxpool import tiled_max_pool, tiled_max_pool_backward


class TiledMaxPool(Layer):
    """y = max over each kh x kw tile of x (then max(0, y) if `relu`).

    x: (N, C, H, W) float32/64 on the CPU -> y: (N, C, H // kh, W // kw).
    backward: dx = dout at each window's maximum (where it passed the ReLU), 0 elsewhere.
    """

    def __init__(self, kernel: tuple[int, int], relu: bool, path: str = "") -> None:
        super().__init__(path)
        self.kernel, self.relu = kernel, relu

    @classmethod
    def from_step(cls, step: TiledPoolStep, path: str) -> TiledMaxPool:
        return cls(step.kernel, step.relu, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, x.dim() == 4, "(N, C, H, W)")
        y, switch = tiled_max_pool(x, self.kernel, self.relu)
        self._save(y.shape, x.shape, switch)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        x_shape, switch = self._take(dout)
        return tiled_max_pool_backward(dout, switch, self.kernel, x_shape)


class ConvPool(Layer):
    """A convolution (stride 1) and a tiling max-pool (and ReLU) after it, as one layer.

    w: (O, C, KH, KW); b: (O,) or None: views of the module's parameters, named like its own.
    x: (N, C, H, W) -> y: (N, O, OH // ph, OW // pw), (OH, OW) the convolution's output size.
    backward: dw, db from the compiled loops; dx when `input_grad`.
    """

    def __init__(
        self, w: torch.Tensor, b: torch.Tensor | None, padding: tuple[int, int], pool: tuple[int, int], relu: bool,
        path: str = "",
    ) -> None:  # fmt: skip
        super().__init__(path)
        self.params["weight"] = w
        if b is not None:
            self.params["bias"] = b
        self.padding, self.pool, self.relu = padding, pool, relu

    @classmethod
    def from_step(cls, step: ConvPoolStep, path: str) -> ConvPool:
        conv = step.conv
        bias = conv.bias.detach() if conv.bias is not None else None
        return cls(conv.weight.detach(), bias, conv.padding, step.pool.kernel, step.pool.relu, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.params["weight"]
        self._check_input(x, x.dim() == 4 and x.shape[1] == w.shape[1], f"(N, {w.shape[1]}, H, W)")
        y, switch = conv_pool(x, w, self.params.get("bias"), self.padding, self.pool, self.relu)
        self._save(y.shape, x, switch)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        x, switch = self._take(dout)
        w = self.params["weight"]
        dw, db = conv_pool_weight_grad(x, dout, switch, w.shape, self.padding, self.pool)
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = db
        if not self.input_grad:
            return None
        return conv_pool_input_grad(dout, switch, w, self.padding, self.pool, x.shape)
