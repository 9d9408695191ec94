"""The hand-written engine: cnnlab's own forward, backward and update (`cnnlab train --engine manual`).

Step for step what the autograd engine does with torch.autograd and torch.optim:

    logits = network.forward(x)             every layer keeps what its backward needs
    loss   = cross_entropy.forward(logits, y)    (or --loss mse: OneHotMSE)
    dlogits = cross_entropy.backward()      (softmax - target) / N   (mse: 2 (logits - target) / (N K))
    network.backward(dlogits)               layers in reverse, each filling its grads
    + l1.gradient()                         lambda * sign(w), when --l1 is set (in SlicedStep)
    clip_grad_norm(grads)                   when --grad-clip is set (in SlicedStep)
    optimizer.step(grads, lr)               in place, on tensors shared with the model

The network shares storage with `model`, so the trainer's evaluation,
checkpoints and export see every update without knowing which engine made it.
The layers keep what their backward needs, so each slice of a batch gets its
own network over the same parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.backprop.losses import make_loss
from cnnlab.backprop.network import Sequential
from cnnlab.backprop.optim import build_optimizer, param_groups
from cnnlab.backprop.penalty import L1Penalty
from cnnlab.config import TrainConfig
from cnnlab.engine.step import SlicedStep, slices_for


class ManualEngine:
    """Trains `model` (an nn.Sequential, already on its device) with hand-written backprop.

    fast: build the network with the fused layers that run cnnlab's compiled kernels
    (`Sequential.from_torch(fast=True)`, CPU only); slices: see `cnnlab.engine.make_engine`.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, *, fast: bool = True, slices: int | None = None) -> None:
        self.model = model
        count = slices_for(model, slices)
        fast = fast and next(model.parameters()).device.type == "cpu"
        self.networks = [Sequential.from_torch(model, fast=fast) for _ in range(count)]
        self.loss_layers = [make_loss(config.loss, config.label_smoothing) for _ in range(count)]
        for network in self.networks:
            # dL/d(images) is never used: the first layer may skip computing it.
            network.skip_input_grad()
        # name -> tensor shared with the model; frozen ones (--freeze) are neither stepped nor clipped
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        self.params = {name: p for name, p in self.networks[0].parameters().items() if name in trainable}
        self.names, self.sizes = list(self.params), [p.numel() for p in self.params.values()]
        self.optimizer = build_optimizer(config.optim, self.params, param_groups(model, config.optim))
        penalty = L1Penalty(config.l1, self.params) if config.l1 else None
        self.step = SlicedStep(self._loss_and_gradient, self._update, count, config.optim.grad_clip, penalty)

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(x, y, lr, batch)

    def _loss_and_gradient(
        self, index: int, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slice `index`, x: (n, C, H, W), y: (n,), of a batch of `batch` images, through its network.

        Returns the slice's share of the batch's mean loss, its logits (n, K) and the share's
        gradient, every parameter's flattened into one vector (P,) in `self.names` order.
        """
        # Nothing here requires grad (the layers hold detached views of the parameters);
        # no_grad says so, and spares every operation autograd's bookkeeping.
        with torch.no_grad():
            network, loss_layer = self.networks[index], self.loss_layers[index]
            # The whole network follows the module's mode, which the trainer sets.
            network.train(self.model.training)
            logits = network.forward(x)  # (n, K)
            share = len(x) / batch  # the slice's mean loss, weighted to its share of the batch's
            loss = loss_layer.forward(logits, y) * share  # ()
            network.backward(loss_layer.backward(share))
            gradients = network.gradients()
            return loss, logits, torch.cat([gradients[name].reshape(-1) for name in self.names])

    def _update(self, gradient: torch.Tensor, lr: float) -> None:
        with torch.no_grad():
            grads = {name: g.view_as(self.params[name]) for name, g in zip(self.names, gradient.split(self.sizes))}
            self.optimizer.step(grads, lr)

    def optimizer_state(self) -> dict:
        """{"optimizer": "sgd" | "adam" | "adamw", "state": {param name: {...tensors, step}}}."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
