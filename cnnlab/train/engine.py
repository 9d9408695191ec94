"""What one optimizer step is: the interface both training engines implement.

The trainer owns the loop, data, schedule and checkpoints; an engine owns the
forward pass, the loss, the backward pass and the parameter update. The
autograd engine below uses torch.autograd and torch.optim; the hand-written
one lives in `cnnlab.backprop.engine`. Both update the parameters of the same
`nn.Module` in place, so evaluation, checkpoints and export never care which
engine trained the model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.backprop.optim import clip_grad_norm
from cnnlab.config import TrainConfig
from cnnlab.train.fastpath import fast_forward
from cnnlab.train.slices import map_slices, slice_count, sliced, sum_in_order


class Engine(Protocol):
    model: nn.Module

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on a batch at learning rate `lr`.

        x: (N, C, H, W) float32, normalized; y: (N,) int64.
        Returns (loss, logits): a 0-dim float tensor (mean over the batch) and (N, K) logits,
        both detached.
        """

    def optimizer_state(self) -> dict:
        """The optimizer's state as plain dicts and tensors (loadable with weights_only=True)."""

    def load_optimizer_state(self, state: dict) -> None: ...


def make_engine(model: nn.Module, config: TrainConfig) -> Engine:
    if config.engine == "manual":
        from cnnlab.backprop.engine import ManualEngine

        return ManualEngine(model, config)
    return AutogradEngine(model, config)


class AutogradEngine:
    """PyTorch's own autograd and optimizers."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        device = next(model.parameters()).device
        # model(x) computed faster on a CPU, same values and gradients (see fastpath.py).
        self.forward = fast_forward(model, device)
        # A CPU's cores each take a slice of the batch (see slices.py); elsewhere 1: the whole batch.
        self.slices = slice_count(model, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.label_smoothing = config.label_smoothing
        self.grad_clip = config.optim.grad_clip
        self.optimizer = build_torch_optimizer(model, config)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = len(x)
        with sliced(batch, self.slices) as count:
            parts = map_slices(lambda _, xs, ys: self._loss_and_gradient(xs, ys, batch), x, y, count)
            losses, logits, gradients = zip(*parts)
            # All parameters' gradients in one flat vector (P,): summing the slices', the norm and
            # the clipping are one operation each instead of one per parameter tensor.
            gradient = sum_in_order(gradients)
            if self.grad_clip > 0:
                clip_grad_norm([gradient], self.grad_clip)  # torch's formula, on a tensor rather than .grads
            for param, grad in zip(self.params, gradient.split(self.sizes)):
                param.grad = grad.view_as(param)  # set, not accumulated: each step starts from none
            self.optimizer.step()
            return sum_in_order(losses), torch.cat(logits)

    def _loss_and_gradient(
        self, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (n, C, H, W), y: (n,), a slice of a batch of `batch` images.

        Returns this slice's share of the batch's mean loss (its sum / batch), its logits (n, K)
        and the share's gradient, all parameters' flattened into one vector (P,) in
        `self.params` order (zero for a parameter the loss does not use).
        """
        logits = self.forward(x)  # (n, K)
        loss = F.cross_entropy(logits, y, reduction="sum", label_smoothing=self.label_smoothing) / batch
        gradients = torch.autograd.grad(loss, self.params, materialize_grads=True)
        return loss.detach(), logits.detach(), torch.cat([g.reshape(-1) for g in gradients])

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def build_torch_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    optim = config.optim
    params = list(model.parameters())
    # One kernel per tensor for the whole update instead of one per operation: LeNet-5's
    # SGD step (10 tensors) takes 0.12 ms instead of 0.39 on a CPU, the same arithmetic.
    fused = params[0].device.type in ("cpu", "cuda")
    if optim.name == "sgd":
        return torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay,
            fused=fused,
        )  # fmt: skip
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=fused)
