"""The search space of `cnnlab tune`: which train options vary, and over what.

A space file is YAML mapping dotted train options (as in config.yaml: `optim.lr`,
`augment.translate`) to a range or a list of choices:

    optim.lr: {low: 0.01, high: 0.5, log: true}    # floats, log-uniform
    epochs: {low: 3, high: 8}                       # whole numbers when low and high are
    optim.weight_decay: {low: 0.0, high: 0.001, step: 0.0001}
    batch_size: {choices: [64, 128, 256]}

The grid sampler tries every combination: a choice list as it is, a range as
`points` values spread over it (default 3; log-spaced with `log: true`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.config import load_yaml_config, resolve_config
from cnnlab.errors import CnnlabError

_RANGE_KEYS = {"low", "high", "log", "step", "points"}
Choice = str | int | float | bool


@dataclass(frozen=True)
class Param:
    """One searched option: `choices`, or a range low..high (ints when both ends are ints)."""

    name: str  # dotted, as in config.yaml
    choices: tuple[Choice, ...] | None = None
    low: float | int = 0
    high: float | int = 0
    log: bool = False
    step: float | int | None = None
    points: int = 3

    @property
    def whole(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)

    def suggest(self, trial: Any) -> Choice:
        """This option's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.whole:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[Choice]:
        """The values the grid sampler tries."""
        if self.choices is not None:
            return list(self.choices)
        if self.log:
            values = [math.exp(math.log(self.low) + i * (math.log(self.high) - math.log(self.low)) / (self.points - 1))
                      for i in range(self.points)]  # fmt: skip
        else:
            values = [self.low + i * (self.high - self.low) / (self.points - 1) for i in range(self.points)]
        if self.whole:
            return sorted({round(v) for v in values})
        return [float(f"{v:.6g}") for v in values]

    def extremes(self) -> list[Choice]:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


# Ranges that suit each model; a model not listed gets the general space.
_GENERAL: dict[str, dict[str, Any]] = {
    "optim.lr": {"low": 0.01, "high": 0.4, "log": True},
    "optim.momentum": {"low": 0.8, "high": 0.95},
    "optim.weight_decay": {"low": 1e-5, "high": 1e-3, "log": True},
    "batch_size": {"choices": [64, 128, 256]},
    "label_smoothing": {"low": 0.0, "high": 0.15},
}
DEFAULT_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    # LeNet-5 gains most from the rate, the batch and light augmentation (docs/performance.md).
    "lenet5": {**_GENERAL, "augment.translate": {"low": 0.0, "high": 0.1}},
    "simple_cnn": _GENERAL,
    "cifar_cnn": {**_GENERAL, "augment.crop_padding": {"choices": [0, 2, 4]}},
    # Batch normalization takes larger rates; deep nets want more decay.
    "resnet8": {
        **_GENERAL,
        "optim.lr": {"low": 0.02, "high": 0.8, "log": True},
        "optim.weight_decay": {"low": 1e-4, "high": 3e-3, "log": True},
    },
}


def default_space(model: str) -> list[Param]:
    return parse_space(DEFAULT_SPACES.get(model, _GENERAL), f"the default space for {model}")


def load_space(path: Path) -> list[Param]:
    return parse_space(load_yaml_config(path), str(path))


def parse_space(data: dict[str, Any], origin: str) -> list[Param]:
    """Params from a space mapping; CnnlabError naming the entry for anything malformed."""
    if not data:
        raise CnnlabError(f"{origin} names no option to search: map options to ranges, e.g. optim.lr: {{low: 0.01, high: 0.3}}")
    return [_param(str(name), spec, origin) for name, spec in data.items()]


def _param(name: str, spec: Any, origin: str) -> Param:
    where = f"{origin}: {name}"
    if not isinstance(spec, dict):
        raise CnnlabError(f"{where} must be a mapping such as {{low: 0.01, high: 0.3}} or {{choices: [64, 128]}}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        plain = isinstance(choices, list) and all(isinstance(c, (str, int, float, bool)) for c in choices)
        if set(spec) != {"choices"} or not choices or not plain:
            raise CnnlabError(f"{where}: choices must be the only key, a non-empty list of plain values")
        return Param(name, choices=tuple(choices))
    unknown = sorted(set(spec) - _RANGE_KEYS)
    if unknown or "low" not in spec or "high" not in spec:
        raise CnnlabError(f"{where} needs low and high (and optionally log, step, points), or choices; got {sorted(spec)}")
    low, high, log, step, points = spec["low"], spec["high"], spec.get("log", False), spec.get("step"), spec.get("points", 3)
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise CnnlabError(f"{where}: low, high and step must be finite numbers")
    if not low < high or not isinstance(log, bool) or (log and low <= 0) or (step is not None and step <= 0):
        raise CnnlabError(f"{where}: needs low < high, log true or false (log only with low > 0), step > 0")
    if log and step is not None:
        raise CnnlabError(f"{where}: a log range cannot have a step")
    if type(points) is not int or points < 2:
        raise CnnlabError(f"{where}: points must be a whole number >= 2")
    return Param(name, low=low, high=high, log=log, step=step, points=points)


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """{"optim.lr": 0.1, "epochs": 3} -> {"optim": {"lr": 0.1}, "epochs": 3}, as a config layer."""
    options: dict[str, Any] = {}
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        target = options
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return options


def check_space(space: list[Param], fixed: tuple[dict[str, Any], ...], origin: str, recipe: bool) -> None:
    """Refuse a space whose options are unknown or whose values a train option cannot take.

    fixed: the config layers every trial shares, under the searched values.
    """
    for param in space:
        for value in param.extremes():
            resolve_config(*fixed, nested({param.name: value}), origin=origin, recipe=recipe)
