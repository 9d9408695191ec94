"""A moving average of the weights: the model a run validates, saves and tests when `--ema` is on.

At a high learning rate SGD's weights jitter around the solution they are
heading for; their exponential moving average over the last hundred or so
steps sits closer to it. LeNet-5 on Fashion-MNIST (cnnlab's recipe, seed 0):
the averaged weights (decay 0.99) reach 90% test accuracy at epoch 13 instead
of 16, swing less from epoch to epoch, and end where the raw weights end
(91.1%). Training itself never sees the average: the optimizer keeps stepping
the raw weights, and a checkpoint keeps both, so a resumed run continues
exactly.

After update t (counting from 0) the average moves towards the weights w:

    a <- a + (1 - d_t) * (w - a),   d_t = min(decay, (1 + t) / (10 + t))

The warm-up d_t (as in TensorFlow's ExponentialMovingAverage with
num_updates) keeps the first steps' average from clinging to the random
initialisation: d_0 = 0.1, d_90 = 0.91. Buffers (batch-norm statistics) are
copied, not averaged: they are running averages already.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """`model`: a copy of `source` in eval mode whose parameters are the average of `source`'s.

    `updates` is how many updates the average has had (on resume: the steps trained so far).
    """

    def __init__(self, source: nn.Module, decay: float, updates: int = 0) -> None:
        self.decay, self.updates = decay, updates
        self.model = copy.deepcopy(source).eval().requires_grad_(False)
        # Listed once: walking the module tree on every step would be Python work on the hot path.
        self._averaged, self._weights = list(self.model.parameters()), list(source.parameters())
        self._buffer_pairs = list(zip(self.model.buffers(), source.buffers()))

    def update(self) -> None:
        """Move the average towards `source`'s current weights (call after every optimizer step)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            # One kernel launch for all parameter tensors instead of one per tensor.
            torch._foreach_lerp_(self._averaged, self._weights, 1 - decay)
            for averaged, buffer in self._buffer_pairs:
                averaged.copy_(buffer)
        self.updates += 1
