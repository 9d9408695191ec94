"""Backpropagation written out by hand: layers, losses, optimizers and a training engine.

Every layer has a `forward` that keeps what its `backward` needs and a
`backward` that applies the chain rule, in plain tensor operations, without
torch.autograd. `Sequential.from_torch` rebuilds a registered model from these
layers, sharing its parameters; `ManualEngine` trains with it
(`cnnlab train --engine manual`); `gradcheck` compares every layer's gradients
with autograd and finite differences (`cnnlab gradcheck`). docs/backprop.md
derives each backward pass.
"""

from cnnlab.backprop.network import Sequential, layer_from_torch

__all__ = ["Sequential", "layer_from_torch"]
