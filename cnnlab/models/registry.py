"""Models register themselves by name; adding a model is adding a file.

Every model is built from (in_shape, num_classes, dropout) and is an `nn.Sequential`
of standard torch layers and cnnlab's two containers of them (`Residual` blocks,
the recurrent `RowReader`). Keeping to that set is what lets
the hand-written engine in `cnnlab.backprop` rebuild any registered model layer
for layer, with the same state_dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models.widths import with_widths

# (in_shape, num_classes, dropout) -> model; dropout: the probability of the head's Dropout layers
Builder = Callable[[tuple[int, int, int], int, float], nn.Sequential]


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


def create_model(
    name: str, in_shape: tuple[int, int, int], num_classes: int, *, dropout: float = 0.0, widths: list[int] | None = None
) -> nn.Sequential:
    """A freshly initialised model taking (N, *in_shape) float32 and giving (N, num_classes) logits.

    dropout: the probability of the Dropout layers in front of the classifier head's fully
    connected layers (`classifier_head`); 0 builds none, so the state_dict keys stay those of the plain model.
    widths: a channel-pruned model's layer widths (cnnlab/models/widths.py); None: the registered ones.
    """
    if num_classes < 2:
        raise CnnlabError(f"a classifier needs at least 2 classes, the dataset has {num_classes}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise CnnlabError(f"--dropout must be in [0, 1) (0 turns it off; 0.5 is typical), got {dropout}")
    model = get_model_spec(name).build(tuple(in_shape), num_classes, float(dropout))
    return model if widths is None else with_widths(model, list(widths))


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


def classifier_head(n_features: int, hidden: tuple[int, ...], num_classes: int, *, dropout: float, batch_norm: bool = False) -> list[nn.Module]:
    """Fully connected layers n_features -> *hidden -> num_classes, ReLU between them.

    (N, n_features) -> (N, num_classes) logits. With dropout > 0 every fully connected layer
    gets a Dropout on its input (Hinton et al., 2012; Srivastava et al., 2014); with batch_norm
    every hidden one a BatchNorm1d between it and its ReLU (its bias is then redundant: the
    norm's shift replaces it).
    """
    layers: list[nn.Module] = []
    sizes = (n_features, *hidden)
    for n_in, n_out in zip(sizes, hidden):
        layers += _dropped(dropout) + [nn.Linear(n_in, n_out, bias=not batch_norm)]
        layers += [nn.BatchNorm1d(n_out), nn.ReLU()] if batch_norm else [nn.ReLU()]
    return layers + _dropped(dropout) + [nn.Linear(sizes[-1], num_classes)]


def conv_block(in_channels: int, out_channels: int, *, batch_norm: bool, **conv: int) -> list[nn.Module]:
    """Conv2d -> (BatchNorm2d) -> ReLU; with batch norm the conv has no bias, the norm's shift replaces it."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, bias=not batch_norm, **conv)]
    return layers + ([nn.BatchNorm2d(out_channels), nn.ReLU()] if batch_norm else [nn.ReLU()])


def _dropped(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []
