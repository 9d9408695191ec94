"""Checkpoints: self-describing dicts of plain values and tensors.

A checkpoint holds everything needed to rebuild the model without the run that
made it (model name and config, weights, normalization, class names) and to
continue that run exactly (optimizer state, epoch, step, RNG states, config).
With `--ema` the weights are the moving average (what was validated and is
used from then on) and `training_state` holds the raw weights training
continues from.
It loads with `torch.load(weights_only=True)`, so a hostile file cannot run
code, and it is written atomically.

Each checkpoint NAME.pt has a sidecar NAME.pt.sha256 (in `sha256sum` format, so
`sha256sum -c` checks it too) written atomically after it; loading verifies the
bytes against it and refuses a file that changed since. A sidecar rather than a
digest inside the file: the file stays a plain `torch.save` zip that any tool can
read, and the digest covers every byte of it. A checkpoint without a sidecar (an
older one, or one whose writer was killed between the two renames) loads unverified.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlab.atomicfile import atomic_copy, atomic_write_bytes, atomic_write_text
from cnnlab.data.dataset import Normalization
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model

FORMAT_VERSION = 1
_FORMAT_KEY = "cnnlab_checkpoint"


@dataclass
class Checkpoint:
    """model: {"name", "in_shape", "num_classes", "dropout"} (a checkpoint without "dropout" has none),
    and "widths" for a narrowed model (cnnlab.models.widths);
    the other fields as saved by `save_checkpoint`.

    model_state: the weights to use; training_state: the weights to resume training from,
    None where they are model_state. epoch_begun: where training stopped inside epoch
    `epoch` + 1, for a checkpoint saved on a signal mid-epoch (cnnlab.train.loop.EpochSoFar),
    else None. source and sha256: the file it was read from and the
    SHA-256 of its bytes (None for a checkpoint made in memory); not saved.
    """

    model: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    normalization: Normalization
    classes: tuple[str, ...]
    dataset: str
    epoch: int = 0
    step: int = 0
    optimizer_state: dict | None = None
    rng: dict[str, torch.Tensor] | None = None
    config: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    training_state: dict[str, torch.Tensor] | None = None
    epoch_begun: dict[str, Any] | None = None
    source: Path | None = None
    sha256: str | None = None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.model["in_shape"])  # type: ignore[return-value]

    def build_model(self) -> nn.Module:
        """The model with the checkpoint's weights, on the CPU, in eval mode."""
        model = create_model(self.model["name"], self.in_shape, self.model["num_classes"],
                             dropout=self.model.get("dropout", 0.0), widths=self.model.get("widths"))  # fmt: skip
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in self.model_state.items()}
        if expected != found:
            raise CnnlabError(
                f"the checkpoint's weights do not fit model '{self.model['name']}' "
                f"for input {self.in_shape}: it was saved from a different model"
            )
        model.load_state_dict(self.model_state)
        return model.eval()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    payload = {
        _FORMAT_KEY: FORMAT_VERSION,
        "model": {**checkpoint.model, "in_shape": list(checkpoint.in_shape)},
        "model_state": _on_cpu(checkpoint.model_state),
        "normalization": checkpoint.normalization.to_dict(),
        "classes": list(checkpoint.classes),
        "dataset": checkpoint.dataset,
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "optimizer_state": checkpoint.optimizer_state,
        "rng": checkpoint.rng,
        "config": checkpoint.config,
        "metrics": checkpoint.metrics,
        "training_state": _on_cpu(checkpoint.training_state),
        "epoch_begun": checkpoint.epoch_begun,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest()
    # Three atomic steps, and a kill between any two leaves a file that matches its sidecar:
    # the sidecar first lists the new digest beside the old ones, then the file is replaced,
    # then the sidecar keeps the new digest alone.
    _write_digests(path, [digest, *_digests_of(path)])
    atomic_write_bytes(path, data)
    _write_digests(path, [digest])


def copy_checkpoint(source: Path, target: Path) -> None:
    """Make checkpoint `target` (and its sidecar) a copy of `source`, atomically, in the order `save_checkpoint` uses."""
    digests = _digests_of(source)
    _write_digests(target, [*digests, *_digests_of(target)])
    atomic_copy(source, target)
    _write_digests(target, digests)


def _digests_of(path: Path) -> list[str]:
    """The digests `path`'s current bytes may have: its sidecar's, or computed for a file without one."""
    sidecar = digest_path(path)
    if sidecar.is_file():
        return _recorded_digests(sidecar)
    return [hashlib.sha256(path.read_bytes()).hexdigest()] if Path(path).is_file() else []


def _write_digests(path: Path, digests: list[str]) -> None:
    unique = list(dict.fromkeys(digests))
    atomic_write_text(digest_path(path), "".join(f"{d}  {Path(path).name}\n" for d in unique))


def _recorded_digests(sidecar: Path) -> list[str]:
    """The SHA-256 digests listed in `sidecar`; [] when it is unreadable or malformed."""
    try:
        lines = sidecar.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    digests = [line.split()[0].lower() for line in lines if line.split()]
    return digests if digests and all(len(d) == 64 for d in digests) else []


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of checkpoint `path` is kept: NAME.pt -> NAME.pt.sha256."""
    return Path(path).with_name(Path(path).name + ".sha256")


def _on_cpu(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.detach().cpu() for k, v in state.items()}


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"checkpoint {path} does not exist: pass a .pt file or a run directory")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CnnlabError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    _verify_digest(path, digest)
    try:
        # From the bytes just verified, not the path: the file could change in between.
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            # torch's message suggests weights_only=False, which would let the file run code: never pass that on.
            raise CnnlabError(
                f"{path} is not a readable cnnlab checkpoint: it holds objects other than tensors and plain values, "
                "which are unsafe to load; use a checkpoint written by `cnnlab train`"
            ) from None
        raise CnnlabError(f"{path} is not a readable cnnlab checkpoint ({_reason(exc)}): it is corrupt or of another kind") from None
    except Exception as exc:  # noqa: BLE001 - damaged bytes fail the unpickler in many ways (IndexError, struct.error, ...)
        raise CnnlabError(f"{path} is not a readable cnnlab checkpoint ({_reason(exc)}): it is corrupt or of another kind") from None
    marker = payload.get(_FORMAT_KEY) if isinstance(payload, dict) else None
    if type(marker) is not int:  # noqa: E721 - a bool or a tensor is no format version
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no format marker): pass a file written by `cnnlab train`")
    if marker > FORMAT_VERSION:
        raise CnnlabError(f"{path} uses checkpoint format {payload[_FORMAT_KEY]}; upgrade cnnlab to read it")
    try:
        _check_fields(payload)
        return Checkpoint(
            model=payload["model"],
            model_state=payload["model_state"],
            normalization=Normalization.from_dict(payload["normalization"]),
            classes=tuple(payload["classes"]),
            dataset=payload["dataset"],
            epoch=payload["epoch"],
            step=payload["step"],
            optimizer_state=payload.get("optimizer_state"),
            rng=payload.get("rng"),
            config=payload.get("config"),
            metrics=payload.get("metrics"),
            training_state=payload.get("training_state"),
            epoch_begun=payload.get("epoch_begun"),
            source=path,
            sha256=digest,
        )
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise CnnlabError(f"{path} is an incomplete or malformed cnnlab checkpoint ({_reason(exc)}): it is corrupt") from None


def _check_fields(payload: dict) -> None:
    """Raise TypeError unless the fields a checkpoint is rebuilt from have the types save_checkpoint writes."""
    model = payload["model"]
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("num_classes"), int)
            and isinstance(model.get("in_shape"), (list, tuple)) and len(model["in_shape"]) == 3
            and all(type(v) is int for v in model["in_shape"])):  # noqa: E721  # fmt: skip
        raise TypeError("model must name a model, its input shape and its class count")
    dropout = model.get("dropout", 0.0)
    if not (type(dropout) in (int, float) and 0 <= dropout < 1):  # noqa: E721 - a bool is no probability
        raise TypeError("model's dropout must be a probability in [0, 1)")
    widths = model.get("widths")
    if widths is not None and not (isinstance(widths, (list, tuple)) and all(type(w) is int for w in widths)):  # noqa: E721
        raise TypeError("model widths must be a list of whole numbers")
    state = payload["model_state"]
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise TypeError("model_state must map names to tensors")
    if not (isinstance(payload["classes"], (list, tuple)) and all(isinstance(c, str) for c in payload["classes"])):
        raise TypeError("classes must be a list of names")
    if not isinstance(payload["dataset"], str) or type(payload["epoch"]) is not int or type(payload["step"]) is not int:  # noqa: E721
        raise TypeError("dataset must be a name, epoch and step whole numbers")


def _verify_digest(path: Path, digest: str) -> None:
    """Raise a CnnlabError if `path` has a digest sidecar and `digest` (of the bytes read) is not in it."""
    sidecar = digest_path(path)
    if not sidecar.exists():
        return
    recorded = _recorded_digests(sidecar)
    if not recorded:
        raise CnnlabError(f"{sidecar} is not a SHA-256 line: {path} cannot be verified; delete {sidecar.name} to load it unverified")
    if digest not in recorded:
        raise CnnlabError(
            f"{path} is corrupt: its bytes do not match the SHA-256 in {sidecar.name} "
            "(the file changed after it was written); use another checkpoint"
        )


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, short, without torch's advice to load unsafely."""
    lines = str(exc).strip().splitlines()
    reason = lines[0][:200] if lines else type(exc).__name__
    return type(exc).__name__ if "weights_only" in reason else reason


def resolve_checkpoint_path(run_or_checkpoint: Path) -> Path:
    """A run directory means its best checkpoint; anything else is taken as a checkpoint file."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise CnnlabError(f"{path} holds no checkpoints/best.pt or checkpoints/last.pt: is it a cnnlab run directory?")
    return path
