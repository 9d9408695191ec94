"""One optimizer step over a batch split into slices: the skeleton both engines share.

    slices' losses and gradients    each slice on its own core (cnnlab.fast.slices)
    gradient = sum in slice order   (P,): every parameter's, flattened into one vector
    + the L1 penalty's              when --l1 is set (cnnlab.backprop.penalty), loss and gradient
    clip its norm                   when --grad-clip is set
    update(gradient, lr)            the engine's optimizer, in place

An engine supplies the two parts that differ: how one slice's loss and
gradient are computed (autograd or the hand-written backward pass) and how
the update is applied (torch.optim or cnnlab.backprop.optim). Each slice's
loss is its sum over images divided by the whole batch's size, so the
slices' losses and gradients add up to the batch mean's; they are added in
slice order, so a run repeats bit for bit on the same machine.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from cnnlab.backprop.optim import clip_grad_norm
from cnnlab.backprop.penalty import L1Penalty
from cnnlab.fast.slices import map_slices, slice_count, sliced, sum_in_order

# (slice index, x (n, C, H, W), y (n,), batch size) -> (the slice's share of the batch's mean loss (),
# its logits (n, K), the share's gradient (P,)), all detached
LossAndGradient = Callable[[int, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Update = Callable[[torch.Tensor, float], None]  # (gradient (P,), learning rate) -> parameters updated in place
# (gradient (P,), loss ()) of this process's shard -> their sums over a data-parallel job's processes
Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Engine(Protocol):
    model: nn.Module
    names: list[str]  # the parameters' state_dict names, in the order of the step's flat gradient
    sizes: list[int]  # and their sizes: gradient.split(sizes) gives each parameter's
    step: SlicedStep

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on a batch at learning rate `lr`.

        x: (N, C, H, W) float32, normalized; y: (N,) int64.
        batch: in a data-parallel job, the size of the global batch x is a shard of (SlicedStep).
        Returns (loss, logits): a 0-dim float tensor (mean over the batch) and (N, K) logits,
        both detached.
        """

    def optimizer_state(self) -> dict:
        """The optimizer's state as plain dicts and tensors (loadable with weights_only=True)."""

    def load_optimizer_state(self, state: dict) -> None: ...


def slices_for(model: nn.Module, slices: int | None) -> int:
    """How many slices to split batches into: `slices` as given, or one per core where the model allows (None)."""
    if slices is None:
        return slice_count(model, next(model.parameters()).device)
    if slices < 1:
        raise ValueError(f"slices must be at least 1, got {slices}")
    return slices


class SlicedStep:
    """step(x, y, lr) -> (loss, logits): slices' gradients summed in order, penalized, clipped, applied by `update`.

    penalty: the L1 penalty over the same parameters in the same order as the gradient, or None.
    """

    def __init__(
        self, loss_and_gradient: LossAndGradient, update: Update, slices: int, grad_clip: float,
        penalty: L1Penalty | None = None,
    ) -> None:  # fmt: skip
        self.loss_and_gradient, self.update = loss_and_gradient, update
        self.slices, self.grad_clip, self.penalty = slices, grad_clip, penalty
        self.reduce: Reduce | None = None  # set in a data-parallel job (cnnlab.train.distributed)
        # Called with each step's gradient (P,) before clipping, while set: training diagnostics
        # (cnnlab.train.diagnostics) read the engine's own gradients through it.
        self.observe: Callable[[torch.Tensor], None] | None = None

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (n, C, H, W) float32, normalized; y: (n,) int64 -> (mean loss (), logits (n, K)).

        batch: the size of the global batch x is this process's shard of, in a data-parallel
        job (`reduce` then sums the shards'); None when x is the whole batch.
        """
        batch = len(x) if batch is None else batch
        with sliced(len(x), self.slices) as count:
            parts = map_slices(lambda i, xs, ys: self.loss_and_gradient(i, xs, ys, batch), x, y, count)
            losses, logits, gradients = zip(*parts)
            # One flat vector: summing the slices', the norm and the clipping are one operation
            # each instead of one per parameter tensor.
            gradient, loss = sum_in_order(gradients), sum_in_order(losses)  # (P,), ()
            if self.reduce is not None:
                gradient, loss = self.reduce(gradient, loss)
            # After the reduction: once per global batch, not per slice or process (it does not depend on the images).
            if self.penalty is not None:
                loss = loss + self.penalty.forward().to(loss.dtype)
                gradient += self.penalty.gradient()
            if self.observe is not None:
                self.observe(gradient)
            if self.grad_clip > 0:
                clip_grad_norm([gradient], self.grad_clip)  # torch's formula
            self.update(gradient, lr)
            return loss, torch.cat(logits)
