"""The autograd engine: PyTorch's torch.autograd for the gradients and torch.optim for the update.

With --precision bf16 or fp16 the forward pass runs under torch.autocast: convolutions and
matrix products in the half type, the loss and the gradient sum in fp32, the weights and the
optimizer in fp32. cnnlab's compiled kernels (cnnlab.fast) compute in fp32 only, so a half
precision run goes through the model's own torch layers. fp16 (CUDA only) also scales the loss
(`LossScale`): its gradients would otherwise underflow; bf16 has fp32's range and needs none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.backprop.losses import one_hot_targets
from cnnlab.backprop.optim import param_groups
from cnnlab.backprop.penalty import L1Penalty
from cnnlab.config import TrainConfig, check_precision
from cnnlab.engine.step import SlicedStep, slices_for
from cnnlab.fast.forward import fast_forward
from cnnlab.fast.slices import splittable


class AutogradEngine:
    """Trains `model` (already on its device) with torch.autograd and torch.optim.

    fast: model(x) through `cnnlab.fast.forward` (same values and gradients up to rounding,
    less time on a CPU; fp32 only); slices: see `cnnlab.engine.make_engine`.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, fast: bool = True, slices: int | None = None) -> None:
        self.model = model
        device = next(model.parameters()).device
        check_precision(config.precision, device.type)
        self.device_type = device.type
        self.autocast = AUTOCAST[config.precision]  # None: fp32
        self.forward = fast_forward(model, device) if fast and self.autocast is None else model
        # A convolutional model that neither the per-core slices nor the compiled kernels take (batch
        # norm: the ResNets, the _bn models) trains 1.3-1.45x faster on a CPU in the channels-last
        # layout, where oneDNN's convolutions need no reorder (bench/precision.py, docs/performance.md).
        self.channels_last = (device.type == "cpu" and self.forward is model and not splittable(model)
                              and any(isinstance(m, nn.Conv2d) for m in model.modules()))  # fmt: skip
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.names, self.params = list(named), list(named.values())
        self.sizes = [p.numel() for p in self.params]
        self.loss, self.label_smoothing = config.loss, config.label_smoothing
        self.loss_scale = LossScale() if config.precision == "fp16" else None
        self.optimizer = build_torch_optimizer(model, config)
        penalty = L1Penalty(config.l1, named) if config.l1 else None
        self.step = SlicedStep(
            self._loss_and_gradient, self._update, slices_for(model, slices), config.optim.grad_clip, penalty
        )

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(x, y, lr, batch)

    def _loss_and_gradient(
        self, _: int, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (n, C, H, W), y: (n,), a slice of a batch of `batch` images.

        Returns this slice's share of the batch's mean loss (its sum / batch), its logits (n, K)
        and the share's gradient, all parameters' flattened into one vector (P,) in
        `self.params` order (zero for a parameter the loss does not use).
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # the same (n, C, H, W), strided as the weights
        with torch.autocast(self.device_type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.forward(x)  # (n, K), in the autocast type
        if self.autocast is not None:
            logits = logits.float()  # the loss in fp32
        if self.loss == "mse":  # the mean over the batch's N K elements, as nn.MSELoss on one-hot targets
            targets = one_hot_targets(y, logits.shape[1], self.label_smoothing, logits.dtype)  # (n, K)
            loss = F.mse_loss(logits, targets, reduction="sum") / (batch * logits.shape[1])
        else:
            loss = F.cross_entropy(logits, y, reduction="sum", label_smoothing=self.label_smoothing) / batch
        scale = self.loss_scale.scale if self.loss_scale is not None else 1.0
        gradients = torch.autograd.grad(loss * scale if scale != 1.0 else loss, self.params, materialize_grads=True)
        gradient = torch.cat([g.reshape(-1) for g in gradients])
        return loss.detach(), logits.detach(), gradient / scale if scale != 1.0 else gradient

    def _update(self, gradient: torch.Tensor, lr: float) -> None:
        if self.loss_scale is not None and not self.loss_scale.update(gradient):
            return  # the scaled fp16 gradient overflowed: this step is skipped, the scale halved
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # the same product the hand-written optimizers take
        for param, grad in zip(self.params, gradient.split(self.sizes)):
            # Set, not accumulated: each step starts from none. Strided as the parameter (a channels-last
            # weight's takes a copy): torch.optim's foreach kernels step a parameter and its gradient
            # element by element in memory order, so two layouts would pair the wrong elements.
            grad = grad.view_as(param)
            param.grad = grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)
        self.optimizer.step()

    def optimizer_state(self) -> dict:
        """torch.optim's state_dict; with fp16, and the loss scale under "loss_scale"."""
        state = self.optimizer.state_dict()
        return {**state, "loss_scale": self.loss_scale.state_dict()} if self.loss_scale is not None else state

    def load_optimizer_state(self, state: dict) -> None:
        state = dict(state)
        saved_scale = state.pop("loss_scale", None)
        if self.loss_scale is not None and saved_scale is not None:
            self.loss_scale.load_state_dict(saved_scale)
        scales = [group["lr_scale"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        # torch takes each group's settings from the saved state; the scales are the config's,
        # which a resumed run shares (and a checkpoint saved before there were groups lacks).
        for group, scale in zip(self.optimizer.param_groups, scales):
            group["lr_scale"] = scale


# The type the forward pass computes in under each --precision; None: no autocast.
AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class LossScale:
    """Dynamic loss scaling for fp16 (the policy of torch.amp.GradScaler, on the engine's flat gradient).

    fp16 flushes magnitudes below ~6e-8 to 0, where many gradients live: the loss is multiplied
    by `scale` before the backward pass and the gradient divided by it after. A gradient that
    overflowed (inf or nan) skips its step and halves the scale; `interval` steps in a row
    without one double it.
    """

    def __init__(self, scale: float = 2.0**16, interval: int = 2000) -> None:
        self.scale, self.interval, self.good_steps = scale, interval, 0

    def update(self, gradient: torch.Tensor) -> bool:
        """gradient: (P,), already divided by the scale. True when it is finite and the step may go ahead."""
        if not bool(torch.isfinite(gradient).all()):
            self.scale, self.good_steps = self.scale / 2, 0
            return False
        self.good_steps += 1
        if self.good_steps == self.interval:
            self.scale, self.good_steps = self.scale * 2, 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def build_torch_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """torch.optim's optimizer over `model`'s trainable parameters, in the groups of
    cnnlab.backprop.optim.param_groups: each group carries its "lr_scale" (see `_update`)."""
    optim = config.optim
    named = dict(model.named_parameters())
    groups = [
        {"params": [named[name] for name in group.names], "lr_scale": group.lr_scale,
         "weight_decay": optim.weight_decay if group.decay else 0.0}
        for group in param_groups(model, optim)
    ]  # fmt: skip
    # One kernel per tensor for the whole update instead of one per operation: LeNet-5's
    # SGD step (10 tensors) takes 0.12 ms instead of 0.39 on a CPU, the same arithmetic.
    fused = next(iter(named.values())).device.type in ("cpu", "cuda")
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=fused)
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, betas=optim.betas, fused=fused)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=fused)
