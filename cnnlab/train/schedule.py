"""Learning-rate schedules as pure functions of the step.

The trainer asks for the rate of every step and writes it into the optimizer.
Because the rate depends on nothing but the step number, resuming a run needs
no scheduler state, and both engines (autograd and hand-written) share it.
"""

from __future__ import annotations

import math

from cnnlab.config import OptimConfig


def learning_rate(optim: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`."""
    base = optim.lr
    if optim.schedule == "constant":
        return base
    if optim.schedule == "step":
        return base * optim.gamma ** ((step // steps_per_epoch) // optim.step_size)
    if optim.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    if optim.schedule == "onecycle":
        # Linear warm-up from base/25 to base, then cosine annealing to base/1e4,
        # the shape of torch.optim.lr_scheduler.OneCycleLR with its defaults.
        warmup = max(1, int(optim.warmup_fraction * total_steps))
        initial, final = base / 25.0, base / 1e4
        if step < warmup:
            return initial + (base - initial) * step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {optim.schedule}")
