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
On a CPU, each core runs its own twin of the network on a slice of the batch
(`cnnlab.train.slices`); the slices' gradients add up to the batch's.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.backprop.losses import SoftmaxCrossEntropy
from cnnlab.backprop.network import Sequential
from cnnlab.backprop.optim import build_optimizer, clip_grad_norm
from cnnlab.config import TrainConfig
from cnnlab.train.slices import map_slices, slice_count, sliced, sum_in_order


class ManualEngine:
    """Trains `model` (an nn.Sequential, already on its device) with hand-written backprop."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        # On a CPU each core takes a slice of the batch (cnnlab/train/slices.py). The layers keep
        # what their backward needs, so each slice gets its own network over the same parameters.
        self.slices = slice_count(model, next(model.parameters()).device)
        self.networks = [Sequential.from_torch(model) for _ in range(self.slices)]
        self.loss_layers = [SoftmaxCrossEntropy(config.label_smoothing) for _ in range(self.slices)]
        for network in self.networks:
            # dL/d(images) is never used: the first layer may skip computing it.
            network.skip_input_grad()
        self.grad_clip = config.optim.grad_clip
        self.optimizer = build_optimizer(config.optim, self.networks[0].parameters())

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) float32, normalized; y: (N,) int64 -> (loss (), logits (N, K))."""
        batch = len(x)
        with sliced(batch, self.slices) as count:
            parts = map_slices(lambda i, xs, ys: self._loss_and_gradients(i, xs, ys, batch), x, y, count)
            losses, logits, gradients = zip(*parts)
            grads = {name: sum_in_order([g[name] for g in gradients]) for name in gradients[0]}
            with torch.no_grad():
                if self.grad_clip > 0:
                    clip_grad_norm(grads.values(), self.grad_clip)
                self.optimizer.step(grads, lr)
            return sum_in_order(losses), torch.cat(logits)

    def _loss_and_gradients(
        self, index: int, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Slice `index`, x: (n, C, H, W), y: (n,), of a batch of `batch` images, through its network.

        Returns the slice's share of the batch's mean loss, its logits (n, K) and the share's
        gradient for every parameter by name.
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
            return loss, logits, network.gradients()

    def optimizer_state(self) -> dict:
        """{"optimizer": "sgd" | "adam" | "adamw", "state": {param name: {...tensors, step}}}."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
