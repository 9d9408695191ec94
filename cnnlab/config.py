"""Run configuration: dataclasses with defaults, validated once where they enter.

A `TrainConfig` comes from defaults, then the tuned recipe for its model and
dataset (if there is one), then an optional YAML file, then command line
flags, in that order (`resolve`); the result is validated there, once, and
the code below it receives typed values only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cnnlab.errors import CnnlabError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
ENGINES = ("autograd", "manual")
LOSSES = ("cross-entropy", "mse")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    name: str = "sgd"
    # With batch 128 and one-cycle over 10 epochs, LeNet-5 on Fashion-MNIST tests at
    # 90.5% (0.05: 90.2%; larger batches or rates: lower). docs/performance.md has the sweep.
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    # Coupled L2 for SGD and Adam (weight_decay * w is added to the gradient, as if
    # weight_decay / 2 * ||w||^2 were added to the loss; Adam then rescales it with the rest),
    # decoupled for AdamW (w shrinks by lr * weight_decay * w beside the Adam step; Loshchilov
    # and Hutter, 2019). Every parameter decays, biases and batch-norm weights too.
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "onecycle"
    step_size: int = 5  # epochs between decays, for the step schedule
    gamma: float = 0.1  # decay factor, for the step schedule
    warmup_fraction: float = 0.25  # share of steps spent warming up, for one-cycle
    # Max global gradient norm; 0 turns clipping off. At the peak rate, LeNet-5 on the
    # small digits set diverges without it (85% test instead of 96%); it costs ~3% of a step.
    grad_clip: float = 2.0
    # Parameter groups (cnnlab.backprop.optim.param_groups): the head's learning rate is
    # head_lr_mult times the schedule's; bias_decay False spares biases and norm weights the decay.
    head_lr_mult: float = 1.0
    bias_decay: bool = True

    def validate(self) -> None:
        _check_finite(self)
        if self.name not in OPTIMIZERS:
            raise CnnlabError(f"unknown optimizer '{self.name}': choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise CnnlabError(f"unknown schedule '{self.schedule}': choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise CnnlabError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise CnnlabError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.name == "sgd" and self.momentum == 0:
            raise CnnlabError("--nesterov needs a momentum above 0: set --momentum or --no-nesterov")
        if self.weight_decay < 0:
            raise CnnlabError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise CnnlabError(f"Adam betas must be in [0, 1), got {self.betas}")
        if self.step_size < 1 or not 0 < self.gamma <= 1:
            raise CnnlabError("the step schedule needs --step-size >= 1 and 0 < --gamma <= 1")
        if not 0 < self.warmup_fraction < 1:
            raise CnnlabError(f"--warmup must be in (0, 1), got {self.warmup_fraction}")
        if self.grad_clip < 0:
            raise CnnlabError(f"--grad-clip must be >= 0 (0 turns it off), got {self.grad_clip}")
        if not self.head_lr_mult > 0:
            raise CnnlabError(f"--head-lr-mult must be positive (to fix layers: --freeze), got {self.head_lr_mult}")


@dataclass
class AugmentConfig:
    """Batched data augmentation applied to training batches (all off by default)."""

    crop_padding: int = 0  # random crop after zero-padding by this many pixels
    flip: bool = False  # random horizontal flip
    rotate: float = 0.0  # max rotation in degrees
    translate: float = 0.0  # max shift as a fraction of the image size
    scale: float = 0.0  # max relative zoom in or out
    erase: float = 0.0  # probability of erasing one random rectangle (cutout)

    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.rotate or self.translate or self.scale or self.erase)

    def validate(self) -> None:
        _check_finite(self)
        if self.crop_padding < 0:
            raise CnnlabError(f"crop padding must be >= 0, got {self.crop_padding}")
        if not 0 <= self.rotate <= 180:
            raise CnnlabError(f"rotation must be in [0, 180] degrees, got {self.rotate}")
        if not 0 <= self.translate < 1 or not 0 <= self.scale < 1:
            raise CnnlabError("translate and scale must be fractions in [0, 1)")
        if not 0 <= self.erase <= 1:
            raise CnnlabError(f"erase probability must be in [0, 1], got {self.erase}")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as config.yaml in the run directory."""

    model: str = "lenet5"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    val_fraction: float = 0.1
    label_smoothing: float = 0.0
    loss: str = "cross-entropy"  # or "mse": mean squared error between the logits and the one-hot targets
    dropout: float = 0.0  # probability of the Dropout layers before the classifier's fc layers; 0 = none
    l1: float = 0.0  # lambda of the L1 penalty lambda * sum |w| over conv and fc weights, added to the loss
    # Early stopping: stop after this many epochs without the validation accuracy beating its
    # best by more than min_delta; 0 = off.
    patience: int = 0
    min_delta: float = 0.0
    precision: str = "fp32"  # bf16 / fp16: the forward pass under autocast (autograd engine)
    ema: float = 0.0  # decay of the weights' moving average that is validated, saved and tested; 0 = off
    seed: int = 0
    device: str = "auto"
    engine: str = "autograd"
    name: str | None = None  # run directory name; derived from model, dataset and time when None
    runs_dir: str = "runs"
    strict_data: bool = False  # an unreadable image in a folder: dataset is an error, not a skipped file
    tensorboard: bool = False  # also write each epoch's figures as TensorBoard scalars into RUN/tensorboard
    # Transfer learning (cnnlab.train.transfer): start from a trained run's weights (a run
    # directory, a checkpoint or an exported .safetensors) and keep some layers fixed.
    init_from: str | None = None
    freeze: str | None = None  # comma-separated: "features" and/or layer names ("0,3")
    # How many processes train the run (torchrun's world size): set by the launch, not chosen
    # in a config file; recorded so that a resume can refuse another (cnnlab.train.distributed).
    world_size: int = 1
    sync_bn: bool = False  # data-parallel: batch-norm statistics over the global batch, not each process's shard
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        _check_finite(self)
        if self.epochs < 1:
            raise CnnlabError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise CnnlabError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 <= self.label_smoothing < 1:
            raise CnnlabError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.loss not in LOSSES:
            raise CnnlabError(f"unknown loss '{self.loss}': choose one of {', '.join(LOSSES)}")
        if not 0 <= self.dropout < 1:
            raise CnnlabError(f"--dropout must be in [0, 1) (0 turns it off; 0.5 is typical), got {self.dropout}")
        if self.l1 < 0:
            raise CnnlabError(f"--l1 must be >= 0 (0 turns it off; 1e-5 is typical), got {self.l1}")
        if self.patience < 0:
            raise CnnlabError(f"--patience must be >= 0 epochs (0 turns early stopping off), got {self.patience}")
        if not 0 <= self.min_delta < 1:
            raise CnnlabError(f"--min-delta must be in [0, 1) (a validation accuracy gain, e.g. 0.001), got {self.min_delta}")
        if self.patience and self.val_fraction == 0:
            raise CnnlabError("--patience watches the validation accuracy: it needs --val-fraction above 0")
        if self.min_delta and not self.patience:
            raise CnnlabError("--min-delta needs --patience N: it says what counts as an improvement for early stopping")
        if self.precision not in PRECISIONS:
            raise CnnlabError(f"unknown precision '{self.precision}': choose one of {', '.join(PRECISIONS)}")
        if self.precision != "fp32" and self.engine == "manual":
            raise CnnlabError(
                f"--precision {self.precision} needs --engine autograd: the manual engine's hand-written layers compute "
                "in fp32, so train with --precision fp32 (which overrides a tuned recipe's bf16)"
            )
        if self.device in ("cpu", "mps") or self.device.startswith("cuda"):
            check_precision(self.precision, self.device.partition(":")[0])
        if not 0 <= self.ema < 1:
            raise CnnlabError(f"--ema must be in [0, 1) (0 turns it off; 0.99 is typical), got {self.ema}")
        if self.engine not in ENGINES:
            raise CnnlabError(f"unknown engine '{self.engine}': choose one of {', '.join(ENGINES)}")
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise CnnlabError(f"unknown device '{self.device}': use auto, cpu, cuda, cuda:N or mps")
        if self.world_size < 1:
            raise CnnlabError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.val_fraction < 1:
            raise CnnlabError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        self._validate_transfer()
        self.optim.validate()
        self.augment.validate()

    def _validate_transfer(self) -> None:
        """Whether the layers --freeze names exist is the model's to say (cnnlab.train.transfer)."""
        if self.init_from is not None and not self.init_from.strip():
            raise CnnlabError("--init-from needs a run directory, a checkpoint (.pt) or a .safetensors file")
        if self.freeze is not None:
            if self.init_from is None:
                raise CnnlabError("--freeze needs --init-from: frozen layers would keep their random initial weights")
            if not all(target.strip() for target in self.freeze.split(",")):
                raise CnnlabError(f"--freeze {self.freeze!r}: name layers separated by commas, e.g. features or 0,3")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["optim"]["betas"] = list(self.optim.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> TrainConfig:
        """Build from a (possibly partial) nested dict, rejecting unknown keys by name."""
        data = dict(data)
        optim = _dataclass_from(OptimConfig, data.pop("optim", {}) or {}, f"{origin}: optim")
        augment = _dataclass_from(AugmentConfig, data.pop("augment", {}) or {}, f"{origin}: augment")
        config = _dataclass_from(cls, data, origin)
        config.optim, config.augment = optim, augment
        return config


def check_precision(precision: str, device_type: str) -> None:
    """Refuse a precision `device_type` ("cpu", "cuda", "mps") cannot train in: fp16 needs CUDA,
    and MPS trains in fp32 only here."""
    if precision == "fp16" and device_type != "cuda":
        raise CnnlabError(f"--precision fp16 needs a CUDA GPU, and this run trains on {device_type}: use bf16 or fp32")
    if precision != "fp32" and device_type == "mps":
        raise CnnlabError(f"--precision {precision} is not supported on mps: use fp32")


# The flags whose name is not the field's with dashes; betas has no flag, only its YAML name.
_FLAG_NAMES = {"warmup_fraction": "--warmup", "betas": "optim.betas"}


def _check_finite(section: Any) -> None:
    """Refuse inf and nan in any float option: range checks like `lr > 0` let inf through,
    and the run would only fail at its first step, with a run folder made."""
    for f in fields(section):
        value = getattr(section, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
            flag = _FLAG_NAMES.get(f.name, f"--{f.name.replace('_', '-')}")
            raise CnnlabError(f"{flag} must be a finite number, got {value}")


# Tuned starting points: the options a (model, dataset) pair gets on top of the
# defaults, before a config file and flags. docs/performance.md has the measurements.
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    # 1,295 training images: batches of 32 give enough steps, and small random shifts keep
    # LeNet-5 from memorizing them (98.6-99.2% test over seeds 0-2; the defaults: ~96.5%).
    ("lenet5", "digits"): {"epochs": 15, "batch_size": 32, "optim": {"lr": 0.05}, "augment": {"translate": 0.1}},
    # 54,000 images. LeNet-5 levels off at 90.3-90.7% in 12 epochs; mirrored images and
    # label smoothing over 30 epochs take it to 91.0-91.6%. The batch trades accuracy for
    # speed: 384 trains ~6% more images per second than 256 and
    # ended at 91.13 / 91.55 / 90.97% (seeds 0-2; 256: 91.41 / 91.57 / 91.41%); 512, faster
    # still, at 90.7-91.1%. The weights' moving average and a short warm-up (10% of the
    # steps, not 25%) take the first epoch at 90% test accuracy from 16-21 to 8-11 (seeds
    # 0-2), ending at 91.1-91.3%.
    ("lenet5", "fashion-mnist"): {
        "batch_size": 384, "epochs": 30, "label_smoothing": 0.1, "ema": 0.99,
        "optim": {"lr": 0.2, "warmup_fraction": 0.1}, "augment": {"flip": True},
    },
    # ResNet-20 (He et al.'s CIFAR recipe, at 30 epochs): SGD with Nesterov momentum at 0.1
    # peak (one-cycle), batch 128, weight decay 5e-4, random 2-pixel shifts and mirrored images,
    # label smoothing 0.1. bf16 autocast trains ~1.9x fp32's images per second on a CPU with
    # bf16 instructions (bench/precision.py); on one without, pass --precision fp32. Test
    # accuracy 94.31% in 23 minutes of training on 2 cores (seed 0). docs/performance.md has the run.
    ("resnet20", "fashion-mnist"): {
        "epochs": 30, "precision": "bf16", "label_smoothing": 0.1, "augment": {"crop_padding": 2, "flip": True},
    },
    # The row-by-row LSTM: Adam at 2e-3 peak (one-cycle), batch 128, the gradient norm clipped
    # at 1 and no weight decay: 89.35 / 89.43% test after 10 epochs with the autograd engine
    # (seeds 0 / 1), 89.62% with the manual one (seed 0). docs/backprop.md has the runs.
    ("lstm", "fashion-mnist"): {
        "epochs": 10, "optim": {"name": "adam", "lr": 2e-3, "weight_decay": 0.0, "grad_clip": 1.0},
    },
}


@dataclass(frozen=True)
class Resolution:
    """A resolved and validated config, and what the tuned recipe contributed to it.

    Options are named dotted, as flags land in the config ("optim.lr").
    recipe_applied: the recipe's options that are in effect, with their values;
    recipe_overridden: the ones a config file or flag replaced, as (recipe's value, value in effect).
    """

    config: TrainConfig
    recipe_applied: dict[str, Any]
    recipe_overridden: dict[str, tuple[Any, Any]]


def resolve(*layers: dict[str, Any], origin: str = "config", recipe: bool = True) -> Resolution:
    """Defaults, then the recipe for the model and dataset the layers name, then each layer in turn.

    Layers are nested dicts as in a YAML config file ({"optim": {"lr": 0.1}}); a later
    layer's values win. `recipe=False` leaves the recipe out. Raises CnnlabError for an
    unknown option, a value of the wrong type or one out of range.
    """
    given: dict[str, Any] = {}
    for layer in layers:
        given = _merged(given, layer)
    model, dataset = given.get("model", TrainConfig.model), given.get("dataset", TrainConfig.dataset)
    tuned = recipe_for(model, dataset) if recipe else {}
    config = TrainConfig.from_dict(_merged(tuned, given), origin)
    config.validate()
    # Compared with the config itself, not with the layers: what is reported is what will run.
    options = _flattened(tuned)
    in_effect = {key: _value_at(config, key) for key in options}
    return Resolution(
        config,
        recipe_applied={key: value for key, value in options.items() if in_effect[key] == value},
        recipe_overridden={key: (value, in_effect[key]) for key, value in options.items() if in_effect[key] != value},
    )


def resolve_config(*layers: dict[str, Any], origin: str = "config", recipe: bool = True) -> TrainConfig:
    """The validated config `resolve` makes of `layers`, for callers that need no account of the recipe."""
    return resolve(*layers, origin=origin, recipe=recipe).config


def recipe_for(model: str, dataset: str) -> dict[str, Any]:
    """The tuned options for training `model` on `dataset`; {} where the defaults are the recipe."""
    if not (isinstance(model, str) and isinstance(dataset, str)):
        raise CnnlabError(f"model and dataset must be names, got {model!r} and {dataset!r}")
    return RECIPES.get((model, dataset), {})


def _flattened(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"epochs": 12, "optim": {"lr": 0.15}} -> {"epochs": 12, "optim.lr": 0.15}."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _value_at(config: TrainConfig, dotted: str) -> Any:
    """config's value for a dotted option name: "optim.lr" -> config.optim.lr."""
    return functools.reduce(getattr, dotted.split("."), config)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` with `top`'s values over it, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(merged.get(key), dict) and (value is None or isinstance(value, dict)):
            merged[key] = _merged(merged[key], value or {})  # an empty section ("optim:") changes nothing
        else:
            merged[key] = value
    return merged


def load_yaml_config(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CnnlabError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CnnlabError(f"{path} is not UTF-8 text: save the config file as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CnnlabError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors fail on odd documents in many ways
        # (a date like 2001-13-01, an empty !!timestamp, nesting deeper than Python's stack)
        raise CnnlabError(f"{path} is not a config cnnlab can read ({type(exc).__name__}): write plain values") from None
    if not isinstance(data, dict):
        raise CnnlabError(f"{path} must hold a mapping of option names to values")
    return data


def _dataclass_from(cls: type, data: Any, origin: str):
    if not isinstance(data, dict):
        raise CnnlabError(f"{origin} must be a mapping, got {type(data).__name__}")
    if not all(isinstance(key, str) for key in data):
        raise CnnlabError(f"{origin}: option names must be text, got {sorted(map(repr, data))[:5]}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CnnlabError(f"{origin}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        values[name] = _coerce(value, default, f"{origin}: {name}")
    return cls(**values)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a YAML value against the type of the field's default."""
    if default is None:
        return value if value is None or isinstance(value, str) else _refuse(value, "str", where)
    if value is None:
        raise CnnlabError(f"{where} needs a value, got nothing (null)")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(default, int) and not isinstance(default, bool) and float(value) != int(value):
            raise CnnlabError(f"{where} must be a whole number, got {value}")
        return type(default)(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, tuple) and isinstance(value, (list, tuple)) and len(value) == len(default):
        return tuple(float(v) for v in value)
    raise CnnlabError(f"{where} must be a {type(default).__name__}, got {value!r}")


def _refuse(value: Any, kind: str, where: str):
    raise CnnlabError(f"{where} must be a {kind}, got {value!r}")
