"""The L1 penalty on a network's weights: P = lambda * sum over weights w of sum |w|.

Added to the loss, it pulls every weight towards 0 by the same step whatever its size
(L2 pulls in proportion to it), which drives small weights to exactly 0: a sparse model.
Its gradient is dP/dw = lambda * sign(w), 0 at w = 0 (torch's subgradient of |w|).
Only the weights of convolutions and fully connected layers (the tensors of two or more
dimensions) are penalized: biases and batch-norm scales set offsets and gains, not
connections, and shrinking them only biases the model.
"""

from __future__ import annotations

import torch


class L1Penalty:
    """lambda * sum |w| over the multi-dimensional tensors of `params` (name -> tensor, in the engine's order).

    forward() -> P: () float64; gradient() -> dP/d(params) flattened into one vector (P,) in
    `params`' order, 0 for the tensors not penalized: the layout both engines' steps use.
    """

    def __init__(self, lam: float, params: dict[str, torch.Tensor]) -> None:
        self.lam = lam
        self.params = list(params.values())
        self.penalized = [p.dim() > 1 for p in self.params]
        self.names = [name for name, p in params.items() if p.dim() > 1]

    def forward(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for p, on in zip(self.params, self.penalized):
            if on:
                total = total + p.detach().abs().sum(dtype=torch.float64)
        return self.lam * total

    def gradient(self) -> torch.Tensor:
        parts = [
            (torch.sign(p.detach()) * self.lam) if on else torch.zeros_like(p)
            for p, on in zip(self.params, self.penalized)
        ]
        return torch.cat([part.reshape(-1) for part in parts])
