"""The hand-written training engine: cnnlab's own forward, backward and update.

It implements the `Engine` protocol of `cnnlab.train.engine`, step for step what
the autograd engine does with torch.autograd and torch.optim:

    logits = network.forward(x)             every layer keeps what its backward needs
    loss   = cross_entropy.forward(logits, y)
    dlogits = cross_entropy.backward()      (softmax - target) / N
    network.backward(dlogits)               layers in reverse, each filling its grads
    clip_grad_norm(grads)                   when --grad-clip is set
    optimizer.step(grads, lr)               in place, on tensors shared with the model

The network shares storage with `model`, so the trainer's evaluation,
checkpoints and export see every update without knowing which engine made it.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.backprop.losses import SoftmaxCrossEntropy
from cnnlab.backprop.network import Sequential
from cnnlab.backprop.optim import build_optimizer, clip_grad_norm
from cnnlab.config import TrainConfig


class ManualEngine:
    """Trains `model` (an nn.Sequential, already on its device) with hand-written backprop."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        self.network = Sequential.from_torch(model)
        # dL/d(images) is never used: the first layer may skip computing it.
        self.network.skip_input_grad()
        self.loss = SoftmaxCrossEntropy(config.label_smoothing)
        self.grad_clip = config.optim.grad_clip
        self.optimizer = build_optimizer(config.optim, self.network.parameters())

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) float32, normalized; y: (N,) int64 -> (loss (), logits (N, K))."""
        # Nothing here requires grad (the layers hold detached views of the parameters);
        # no_grad says so, and spares every operation autograd's bookkeeping.
        with torch.no_grad():
            # The whole network follows the module's mode, which the trainer sets.
            self.network.train(self.model.training)
            logits = self.network.forward(x)  # (N, K)
            loss = self.loss.forward(logits, y)  # ()
            self.network.backward(self.loss.backward())
            grads = self.network.gradients()
            if self.grad_clip > 0:
                clip_grad_norm(grads.values(), self.grad_clip)
            self.optimizer.step(grads, lr)
        return loss, logits

    def optimizer_state(self) -> dict:
        """{"optimizer": "sgd" | "adam" | "adamw", "state": {param name: {...tensors, step}}}."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
