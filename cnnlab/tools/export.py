"""`cnnlab export`: a trained run as files that serve without it (ONNX, torch.export, TorchScript, safetensors).

Each format holds the weights of the run's best checkpoint (the moving average
with --ema), for inputs (N, C, H, W) float32 normalized as in training, with a
free batch size; the output is (N, K) logits. What a server needs besides the
weights (class names, input shape, normalization, the framing of the training
images, the out-of-distribution threshold (cnnlab/train/calibrate.py), test
accuracy, cnnlab's version) travels with each file: in the ONNX file's
metadata, and in a `model.json` beside the others. ONNX is checked when it is written:
onnx.checker, then ONNX Runtime against the PyTorch model on up to 1,000 test
images (largest logit difference, top-1 agreement), stored in
`model.onnx.check.json`. A model card (MODEL_CARD.md) says what the model is.

Every file is written atomically: an export that fails half-way leaves the
files of an earlier one intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import cnnlab
from cnnlab.atomicfile import atomic_write_bytes, atomic_write_text
from cnnlab.data.dataset import Normalization
from cnnlab.data.preprocess import Framing
from cnnlab.data.sources import get_source
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.train.calibrate import Calibration, OodCheck, calibration_of
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path

FORMATS = ("onnx", "pt2", "torchscript", "safetensors")
FILES = {"onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
CHECK_IMAGES = 1000
MAX_BATCH = 65536  # the batch axis's upper bound in torch.export's shape constraints


@dataclass(frozen=True)
class ModelInfo:
    """What a server needs to use exported weights: the model, its classes, its input and how to prepare it,
    and when to flag an input as unlike the training data (framing and ood: None where not measured)."""

    name: str
    in_shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]
    normalization: Normalization
    dataset: str
    test_accuracy: float | None
    cnnlab_version: str
    dropout: float = 0.0  # the model's Dropout layers shift its state_dict keys: create_model needs it
    framing: Framing | None = None
    ood: OodCheck | None = None
    widths: tuple[int, ...] | None = None  # a channel-pruned model's layer widths (cnnlab/models/widths.py)

    @classmethod
    def of(cls, checkpoint: Checkpoint, test_accuracy: float | None) -> ModelInfo:
        """The checkpoint's description, with the framing and OOD check measured on its own data splits."""
        calibration = calibration_of(checkpoint)
        widths = checkpoint.model.get("widths")
        return cls(checkpoint.model["name"], checkpoint.in_shape, checkpoint.classes, checkpoint.normalization,
                   checkpoint.dataset, test_accuracy, cnnlab.__version__, checkpoint.model.get("dropout", 0.0),
                   calibration.framing, calibration.ood, None if widths is None else tuple(widths))  # fmt: skip

    def build_model(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The model these weights (model.safetensors' `state`) belong to, loaded, in eval mode, on the CPU."""
        model = create_model(self.name, self.in_shape, len(self.classes), dropout=self.dropout, widths=self.widths)
        try:
            model.load_state_dict(state)
        except RuntimeError:  # missing, unexpected or misshapen tensors: torch's message is a page long
            raise CnnlabError(f"the weights do not fit the {self.name} that model.json describes: export them again") from None
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(in_shape=list(self.in_shape), classes=list(self.classes), normalization=self.normalization.to_dict(),
                    **Calibration(self.framing, self.ood).to_dict(), widths=self.widths and list(self.widths))  # fmt: skip
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str) -> ModelInfo:
        try:
            calibration = Calibration.from_dict(data)
            in_shape = tuple(int(v) for v in data["in_shape"])
            if len(in_shape) != 3 or min(in_shape) < 1:
                raise ValueError(f"in_shape {in_shape}")
            return cls(str(data["name"]), in_shape, tuple(str(c) for c in data["classes"]),  # type: ignore[arg-type]
                       Normalization.from_dict(data["normalization"]), str(data["dataset"]),
                       None if data.get("test_accuracy") is None else float(data["test_accuracy"]),
                       str(data["cnnlab_version"]), float(data.get("dropout", 0.0)),
                       calibration.framing, calibration.ood,
                       None if data.get("widths") is None else tuple(int(w) for w in data["widths"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise CnnlabError(f"{origin} does not describe a cnnlab model ({exc}): export it again with `cnnlab export`") from None


@dataclass(frozen=True)
class Exported:
    """One written file: its format, path and SHA-256."""

    format: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[Exported]
    onnx_check: dict[str, Any] | None


def export_run(run_or_checkpoint: Path, formats: Sequence[str] = FORMATS, out: Path | None = None) -> ExportResult:
    """Write `formats` of the run's best checkpoint into `out` (default: RUN/export), with model.json and a model card."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise CnnlabError(f"unknown export format(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}")
    path = resolve_checkpoint_path(run_or_checkpoint)
    checkpoint = load_checkpoint(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    summary = read_summary(run_dir)
    info = ModelInfo.of(checkpoint, summary.get("test_accuracy"))
    out = Path(out) if out is not None else (run_dir or path.parent) / "export"
    out.mkdir(parents=True, exist_ok=True)
    model = checkpoint.build_model()  # (N, C, H, W) -> (N, K), eval mode, CPU
    example = torch.zeros(2, *info.in_shape)
    writers: dict[str, Callable[[nn.Module, torch.Tensor, ModelInfo], bytes]] = {
        "onnx": onnx_bytes, "pt2": _pt2_bytes, "torchscript": _torchscript_bytes, "safetensors": _safetensors_bytes,
    }  # fmt: skip
    files, onnx_check = [], None
    for name in dict.fromkeys(formats):
        data = writers[name](model, example, info)
        if name == "onnx":
            onnx_check = check_onnx(data, model, info)
            atomic_write_text(out / "model.onnx.check.json", json.dumps(onnx_check, indent=2) + "\n")
        atomic_write_bytes(out / FILES[name], data)
        files.append(Exported(name, out / FILES[name], hashlib.sha256(data).hexdigest()))
    atomic_write_text(out / "model.json", json.dumps({**info.to_dict(), "files": {f.format: {
        "file": f.path.name, "sha256": f.sha256} for f in files}}, indent=2) + "\n")  # fmt: skip
    atomic_write_text(out / "MODEL_CARD.md", model_card(info, checkpoint, summary, onnx_check))
    return ExportResult(out, files, onnx_check)


def read_summary(run_dir: Path | None) -> dict[str, Any]:
    """The run's summary.json ({} without one: a checkpoint file exported on its own)."""
    if run_dir is None or not (run_dir / "summary.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _batch_axis() -> tuple[dict[int, torch.export.Dim]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def onnx_bytes(model: nn.Module, example: torch.Tensor, info: ModelInfo) -> bytes:
    """The model as ONNX (opset of torch's exporter), input "images" (N, C, H, W), output "logits" (N, K)."""
    import onnx

    # The exporter's progress notes (warnings, and log lines such as "torchvision is not installed") are not the
    # user's business.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    with warnings.catch_warnings(), _quieted(registration):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=_batch_axis(), verbose=False)  # fmt: skip
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"cnnlab": json.dumps(info.to_dict())})
    proto.doc_string = f"cnnlab {info.cnnlab_version}: {info.name} trained on {info.dataset}"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


@contextmanager
def _quieted(logger: logging.Logger) -> Iterator[None]:
    """`logger` shows errors only, for the duration."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pt2_bytes(model: nn.Module, example: torch.Tensor, info: ModelInfo) -> bytes:
    """torch.export's ExportedProgram (load with torch.export.load), batch axis free."""
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_axis())
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"cnnlab.json": json.dumps(info.to_dict())})
    return buffer.getvalue()


def _torchscript_bytes(model: nn.Module, example: torch.Tensor, info: ModelInfo) -> bytes:
    """A traced TorchScript module (torch.jit.load): deprecated by torch in favour of torch.export, kept while it works."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, buffer, _extra_files={"cnnlab.json": json.dumps(info.to_dict())})
    return buffer.getvalue()


def _safetensors_bytes(model: nn.Module, example: torch.Tensor, info: ModelInfo) -> bytes:
    """The state_dict as safetensors; with model.json, `ModelInfo.build_model` rebuilds the model."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={"cnnlab": json.dumps(info.to_dict())})


def check_onnx(data: bytes, model: nn.Module, info: ModelInfo) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on up to CHECK_IMAGES test images of the model's dataset."""
    import onnxruntime

    images, source = _check_images(info)
    x = info.normalization.apply(images)  # (N, C, H, W) float32
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(x)  # (N, K)
    got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    return {
        "images": len(x),
        "source": source,
        "max_abs_logit_diff": float((got - expected).abs().max()),
        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).to(torch.float64).mean()),
        "onnxruntime": onnxruntime.__version__,
    }


def _check_images(info: ModelInfo) -> tuple[torch.Tensor, str]:
    """(N, C, H, W) uint8: the dataset's first test images, or seeded noise where the dataset is not here."""
    try:
        _, test = get_source(info.dataset).load(None)
        if test.image_shape == info.in_shape and len(test):
            return test.images[:CHECK_IMAGES], f"{info.dataset} test split"
    except CnnlabError:
        pass
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CHECK_IMAGES, *info.in_shape), dtype=torch.uint8, generator=generator)
    return images, f"random images ({info.dataset} is not on this machine)"


def model_card(info: ModelInfo, checkpoint: Checkpoint, summary: dict[str, Any], onnx_check: dict | None) -> str:
    """MODEL_CARD.md: what the model is, what it was trained on and how, and how well it does."""
    c, h, w = info.in_shape
    accuracy = "not tested" if info.test_accuracy is None else f"{100 * info.test_accuracy:.2f}%"
    lines = [
        f"# {info.name} on {info.dataset}",
        "",
        f"A {info.name} image classifier trained with cnnlab {info.cnnlab_version}.",
        "",
        f"- Input: {c}x{h}x{w} images ({'grey' if c == 1 else 'RGB'}), pixels / 255 normalized with mean "
        f"{_floats(info.normalization.mean)} and std {_floats(info.normalization.std)} per channel.",
        f"- Output: {len(info.classes)} logits, one per class: {', '.join(info.classes)}.",
        f"- Data: `{info.dataset}`; trained {checkpoint.epoch} epochs ({checkpoint.step} steps).",
        f"- Test accuracy: {accuracy}.",
        f"- Preprocessing of user images: {_framing_line(info.framing)}",
        f"- Out-of-distribution flag: {_ood_line(info.ood)}",
    ]
    if onnx_check:
        lines.append(f"- ONNX Runtime against PyTorch on {onnx_check['images']} images ({onnx_check['source']}): "
                     f"largest logit difference {onnx_check['max_abs_logit_diff']:.2e}, top-1 agreement "
                     f"{100 * onnx_check['top1_agreement']:.2f}%.")  # fmt: skip
    per_class = summary.get("test", {}).get("per_class", [])
    if per_class:
        lines += ["", "## Per class (test split)", "", "| class | precision | recall | F1 | images |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
                  for r in per_class]  # fmt: skip
    if checkpoint.config:
        lines += ["", "## Recipe", "", "The resolved training configuration (`cnnlab train --config` takes it):", "",
                  "```yaml", *_yaml_lines(checkpoint.config), "```"]  # fmt: skip
    lines += ["", "## Limits", "",
              "It knows only these classes and images like its training data: anything else still gets one of them.",
              ""]  # fmt: skip
    return "\n".join(lines)


def _framing_line(framing: Framing | None) -> str:
    if framing is None:
        return "resized to the input size (the training images have no uniform background, or were not found)."
    return (
        f"as the training images: {framing.background} background (inverted when the image's border says "
        f"otherwise), cropped to the content, its longer side scaled to {100 * framing.fill:.0f}% of the image, "
        f"centred by its {'centre of mass' if framing.centre == 'mass' else 'bounding box'}."
    )


def _ood_line(ood: OodCheck | None) -> str:
    if ood is None:
        return "none (no validation split was found to calibrate it on)."
    return (
        f"an input whose top class probability is under {ood.threshold:.4f} is flagged; "
        f"{100 * ood.flag_rate:.1f}% of the {ood.images} validation images were."
    )


def _floats(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _yaml_lines(config: dict[str, Any]) -> list[str]:
    import yaml

    return yaml.safe_dump(config, sort_keys=False).rstrip("\n").splitlines()
