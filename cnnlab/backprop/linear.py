"""The fully connected layer and the Flatten that feeds it, forward and backward."""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.backprop.layer import Layer
from cnnlab.errors import CnnlabError


class Linear(Layer):
    """y = x w^T + b, like nn.Linear.

    w: (K, D); b: (K,) or None. x: (N, D) -> y: (N, K).
    backward: dx = dout w (N, D); dw = dout^T x (K, D); db = sum over the batch of dout (K,).
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None, path: str = "") -> None:
        super().__init__(path)
        self.params["weight"] = w
        if b is not None:
            self.params["bias"] = b

    @classmethod
    def from_torch(cls, module: nn.Linear, path: str) -> Linear:
        return cls(module.weight.detach(), module.bias.detach() if module.bias is not None else None, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D) -> y: (N, K)."""
        w, b = self.params["weight"], self.params.get("bias")
        self._check_input(x, x.dim() == 2 and x.shape[1] == w.shape[1], f"(N, {w.shape[1]})")
        # addmm does the product and the bias in one kernel, without an (N, K) temporary.
        y = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
        self._save(y.shape, x)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        """dout: (N, K) -> dx: (N, D), or None when `input_grad` is off; fills dw (K, D), db (K,)."""
        (x,) = self._take(dout)
        self.grads["weight"] = dout.t() @ x
        if "bias" in self.params:
            self.grads["bias"] = dout.sum(0)
        return dout @ self.params["weight"] if self.input_grad else None


class Flatten(Layer):
    """Merges dimensions start_dim..end_dim, like nn.Flatten; backward puts the shape back.

    Default: x: (N, C, H, W) -> y: (N, C*H*W); dx = dout reshaped to (N, C, H, W).
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1, path: str = "") -> None:
        super().__init__(path)
        self.start_dim, self.end_dim = start_dim, end_dim

    @classmethod
    def from_torch(cls, module: nn.Flatten, path: str) -> Flatten:
        return cls(module.start_dim, module.end_dim, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            y = x.flatten(self.start_dim, self.end_dim)
        except (IndexError, RuntimeError):
            raise CnnlabError(
                f"{self} cannot merge dimensions {self.start_dim}..{self.end_dim} of input {tuple(x.shape)}"
            ) from None
        self._save(y.shape, x.shape)
        return y

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        (x_shape,) = self._take(dout)
        return dout.reshape(x_shape)
