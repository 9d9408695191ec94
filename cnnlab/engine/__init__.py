"""Training engines: what one optimizer step is, done by torch.autograd or by cnnlab's own backprop.

The trainer (`cnnlab.train`) owns the loop, data, schedule and checkpoints; an
engine owns the forward pass, the loss, the backward pass and the update.
Both engines run the same `SlicedStep` (step.py) and differ only in how a
slice's loss and gradient are computed and how the update is applied:

- `AutogradEngine` (autograd.py): torch.autograd and torch.optim;
- `ManualEngine` (manual.py): `cnnlab.backprop`'s hand-written layers and optimizers.

Both update the parameters of the same `nn.Module` in place, so evaluation,
checkpoints and export never care which engine trained the model. Their speed
options are explicit (`fast`, `slices`; see `make_engine`).
"""

from __future__ import annotations

from torch import nn

from cnnlab.config import TrainConfig
from cnnlab.engine.step import Engine


def make_engine(model: nn.Module, config: TrainConfig, *, fast: bool = True, slices: int | None = None) -> Engine:
    """The engine `config.engine` names, training `model` (already on its device).

    fast: run the layers `cnnlab.fast.plan` has kernels for on those kernels (CPU only).
    slices: how many slices a CPU's cores split each batch into; None picks one per core
    where the model allows it (cnnlab.fast.slices), 1 turns slicing off.
    """
    if config.engine == "manual":
        from cnnlab.engine.manual import ManualEngine

        return ManualEngine(model, config, fast=fast, slices=slices)
    from cnnlab.engine.autograd import AutogradEngine

    return AutogradEngine(model, config, fast=fast, slices=slices)
