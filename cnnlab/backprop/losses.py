"""Losses: softmax cross-entropy with label smoothing, and mean squared error (on one-hot targets).

A loss ends the chain: forward gives the scalar L, backward gives dL/d(prediction),
the `dout` that the network's backward pass starts from. `make_loss` builds the one
`cnnlab train --loss` names.
"""

from __future__ import annotations

import torch

from cnnlab.errors import CnnlabError


class SoftmaxCrossEntropy:
    """L = mean over the batch of -sum_k q[n, k] log softmax(z[n])_k, like F.cross_entropy.

    z: (N, K) logits; y: (N,) int64 class indices. The target distribution q puts
    1 - eps + eps/K on the true class and eps/K on the others (label smoothing eps;
    eps = 0 is the plain one-hot cross-entropy).

    backward: dL/dz = (softmax(z) - q) / N, (N, K). The log and the exp cancel, which is
    why softmax and cross-entropy are one layer here: the gradient is simply
    "predicted minus wanted".
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return "SoftmaxCrossEntropy"

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: (N, K), y: (N,) -> L: () the mean loss."""
        if z.dim() != 2 or y.shape != (z.shape[0],):
            shapes = f"{tuple(z.shape)} and {tuple(y.shape)}"
            raise CnnlabError(f"{self} expects logits (N, K) and labels (N,), got {shapes}")
        eps = self.label_smoothing
        # log_softmax subtracts the row maximum before exponentiating: no overflow for large logits.
        log_p = torch.log_softmax(z, dim=1)  # (N, K)
        nll = -log_p.gather(1, y.unsqueeze(1)).mean()
        loss = (1 - eps) * nll - eps * log_p.mean() if eps else nll  # log_p.mean() = mean_n (1/K) sum_k
        self._cache = (log_p, y)
        return loss

    def backward(self, dloss: float = 1.0) -> torch.Tensor:
        """-> dL/dz: (N, K), times `dloss` (1 when L is the final loss)."""
        if self._cache is None:
            raise CnnlabError(f"{self}: backward() needs a forward() first (each forward allows one backward)")
        log_p, y = self._cache
        self._cache = None
        n, k = log_p.shape
        eps = self.label_smoothing
        dz = log_p.exp()  # softmax(z); a new tensor, so the in-place edits below are safe
        if eps:
            dz.sub_(eps / k)
        dz[torch.arange(n, device=y.device), y] -= 1 - eps
        return dz.mul_(dloss / n)


class MSELoss:
    """L = mean((p - t)^2) over all elements, like F.mse_loss; dL/dp = 2 (p - t) / numel.

    p (prediction) and t (target): the same shape, any.
    """

    def __init__(self) -> None:
        self._cache: torch.Tensor | None = None

    def __repr__(self) -> str:
        return "MSELoss"

    def forward(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if p.shape != t.shape:
            shapes = f"{tuple(p.shape)} and {tuple(t.shape)}"
            raise CnnlabError(f"{self} needs prediction and target of one shape, got {shapes}")
        diff = p - t
        self._cache = diff
        return (diff * diff).mean()

    def backward(self, dloss: float = 1.0) -> torch.Tensor:
        if self._cache is None:
            raise CnnlabError(f"{self}: backward() needs a forward() first (each forward allows one backward)")
        diff, self._cache = self._cache, None
        return diff * (2 * dloss / diff.numel())


def one_hot_targets(y: torch.Tensor, k: int, label_smoothing: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y: (N,) int64 class indices -> (N, K) targets: 1 - eps + eps/K on the class, eps/K elsewhere."""
    eps = label_smoothing
    return torch.nn.functional.one_hot(y, k).to(dtype).mul_(1 - eps).add_(eps / k)


class OneHotMSE:
    """L = mean over (N, K) of (z - t)^2, t the one-hot targets of y (smoothed with eps), as
    `nn.MSELoss()(model(x), one_hot(y))` trains a classifier; the logits z themselves are
    regressed onto 0 and 1, no softmax.

    z: (N, K) logits; y: (N,) int64. backward: dL/dz = 2 (z - t) / (N K), MSELoss's.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing
        self.mse = MSELoss()

    def __repr__(self) -> str:
        return "OneHotMSE"

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: (N, K), y: (N,) -> L: () the mean over all N K elements."""
        if z.dim() != 2 or y.shape != (z.shape[0],):
            shapes = f"{tuple(z.shape)} and {tuple(y.shape)}"
            raise CnnlabError(f"{self} expects logits (N, K) and labels (N,), got {shapes}")
        return self.mse.forward(z, one_hot_targets(y, z.shape[1], self.label_smoothing, z.dtype))

    def backward(self, dloss: float = 1.0) -> torch.Tensor:
        """-> dL/dz: (N, K), times `dloss`."""
        return self.mse.backward(dloss)


def make_loss(name: str, label_smoothing: float = 0.0) -> SoftmaxCrossEntropy | OneHotMSE:
    """The loss layer `cnnlab train --loss` names: "cross-entropy" or "mse"."""
    return OneHotMSE(label_smoothing) if name == "mse" else SoftmaxCrossEntropy(label_smoothing)
