"""The training engine: the loop, optimizers and schedules, checkpoints, the run directory."""
