"""What a user sees while a run trains: a progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """Reports batches and epochs.

    stream: where lines go (stdout normally, stderr when stdout carries JSON)
    bar:    draw a tqdm bar per epoch; on by default only when the stream is a terminal,
            so logs and pipes get one clean line per epoch
    """

    def __init__(self, stream: TextIO | None = None, bar: bool | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.bar = self.stream.isatty() if bar is None else bar
        self.quiet = quiet
        self._tqdm = None

    def message(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, batches: int, done: int = 0) -> None:
        """Epoch `epoch` of `epochs` starts, or resumes with `done` of its `batches` already trained."""
        if self.bar and not self.quiet:
            from tqdm import tqdm

            self._tqdm = tqdm(total=batches, initial=done, desc=f"epoch {epoch}/{epochs}", file=self.stream,
                              leave=False, unit="batch")  # fmt: skip

    def batch_done(self, loss: float | None = None) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)
            if loss is not None:
                self._tqdm.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def end_epoch(self, row: dict[str, float], epochs: int) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        self.message(
            f"epoch {int(row['epoch']):>3}/{epochs}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:6.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {100 * row['val_accuracy']:6.2f}%  "
            f"lr {row['lr']:.4g}  {row['seconds']:.1f}s  {row['images_per_s']:,.0f} img/s"
        )
