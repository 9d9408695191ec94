"""--tensorboard: each epoch's metrics and per-layer diagnostics, mirrored as TensorBoard scalars.

The run directory stays the record (metrics.csv, diagnostics.json); RUN/tensorboard/ holds
the same figures for users who already follow their runs there (`tensorboard --logdir runs`).
Scalars are keyed by epoch, so a resumed run's repeated epoch overwrites itself in the
charts. Needs the `tensorboard` extra.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.errors import CnnlabError

FOLDER = "tensorboard"


def require_tensorboard() -> None:
    """Refuse --tensorboard up front, before a run folder is made, when its package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ModuleNotFoundError:
        raise CnnlabError("--tensorboard needs the tensorboard package: pip install 'cnnlab[tensorboard]'") from None


class EpochBoard:
    """Writes one epoch at a time into `run_dir`/tensorboard."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / FOLDER))

    def log(self, row: dict[str, float], diagnostics: dict | None) -> None:
        """row: the epoch's metrics.csv row; diagnostics: its diagnostics.json entry, or None."""
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        for layer, figures in (diagnostics or {}).get("layers", {}).items():
            self.writer.add_scalar(f"grad_norm/{layer}", figures["grad_norm"], epoch)
            self.writer.add_scalar(f"update_ratio/{layer}", figures["update_ratio"], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
