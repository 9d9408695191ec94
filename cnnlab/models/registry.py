"""Models register themselves by name; adding a model is adding a file.

Every model is built from (in_shape, num_classes) and is an `nn.Sequential` of
standard torch layers. Keeping to that set is what lets
the hand-written engine in `cnnlab.backprop` rebuild any registered model layer
for layer, with the same state_dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cnnlab.errors import CnnlabError

Builder = Callable[[tuple[int, int, int], int], nn.Sequential]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Builder


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, description: str) -> Callable[[Builder], Builder]:
    def decorate(build: Builder) -> Builder:
        _MODELS[name] = ModelSpec(name, description, build)
        return build

    return decorate


def all_models() -> list[ModelSpec]:
    return list(_MODELS.values())


def get_model_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise CnnlabError(f"unknown model '{name}': choose one of {', '.join(sorted(_MODELS))} (see `cnnlab models`)")
    return _MODELS[name]


def create_model(name: str, in_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """A freshly initialised model taking (N, *in_shape) float32 and giving (N, num_classes) logits."""
    if num_classes < 2:
        raise CnnlabError(f"a classifier needs at least 2 classes, the dataset has {num_classes}")
    return get_model_spec(name).build(tuple(in_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_features(features: nn.Module, in_shape: tuple[int, int, int], model_name: str) -> int:
    """How many numbers `features` produces per image: the input size of the first Linear layer.

    Derived by running one dummy image through, so models adapt to any input
    size instead of hard-coding 16*4*4 (which silently mixes samples when the
    size changes).
    """
    with torch.no_grad():
        try:
            out = features(torch.zeros(1, *in_shape))
        except RuntimeError:
            out = None
    if out is None or out.numel() == 0:
        raise CnnlabError(
            f"model '{model_name}' cannot take {in_shape[1]}x{in_shape[2]} images: they are too small for its "
            "convolutions and pooling; pick another model or larger images"
        )
    return out[0].numel()
