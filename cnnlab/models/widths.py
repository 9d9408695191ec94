"""Narrower versions of a registered model: the same layers, fewer channels and units.

A registered model is an `nn.Sequential` of standard layers (registry.py). Its
*widths* are the output sizes of its Conv2d and Linear layers, in order, the last
one (the class count) left out: [6, 16, 120, 84] for LeNet-5. Structured pruning
removes channels and units, and a checkpoint records the widths it kept, so
`create_model(..., widths=widths)` rebuilds the smaller model from its
name alone, with no pickled module.
"""

from __future__ import annotations

from torch import nn

from cnnlab.errors import CnnlabError

_RESIZED = (nn.Conv2d, nn.Linear)


def layer_widths(model: nn.Sequential, name: str) -> list[int]:
    """The output sizes of `model`'s Conv2d and Linear layers, all but the last.

    Raises CnnlabError for a model that is not a plain chain of them (resnet's residual blocks).
    """
    for layer in model:
        if any(True for _ in layer.parameters()) and not isinstance(layer, (*_RESIZED, nn.BatchNorm2d)):
            raise CnnlabError(
                f"model '{name}' has {type(layer).__name__} layers, and only plain chains of convolutions and fully "
                "connected layers can be narrowed: use --method global-magnitude"
            )
    return [_width(layer) for layer in model if isinstance(layer, _RESIZED)][:-1]


def with_widths(model: nn.Sequential, widths: list[int]) -> nn.Sequential:
    """A freshly initialised copy of `model` whose Conv2d/Linear layers have `widths` outputs (the last keeps its own).

    Each layer's input follows the width before it; a Linear after a Flatten takes
    (channels x positions) inputs, the positions per channel being the original model's.
    """
    resized = [layer for layer in model if isinstance(layer, _RESIZED)]
    if len(widths) != len(resized) - 1 or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise CnnlabError(
            f"layer widths {widths} do not fit this model: it has {len(resized) - 1} resizable layers, "
            "each needs a width of at least 1"
        )
    targets = iter([*widths, _width(resized[-1])])
    layers: list[nn.Module] = []
    old_in = new_in = None  # the previous resized layer's output size, originally and now
    positions = 1  # numbers per channel reaching the next Linear (1 until a Flatten)
    for layer in model:
        if isinstance(layer, nn.Flatten):
            positions = -1  # known at the next Linear, from its original in_features
        if isinstance(layer, _RESIZED):
            old_out, new_out = _width(layer), next(targets)
            first = old_in is None
            if isinstance(layer, nn.Conv2d):
                layer = nn.Conv2d(
                    layer.in_channels if first else new_in, new_out, layer.kernel_size, layer.stride,
                    layer.padding, layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                )  # fmt: skip
            else:
                if positions == -1:
                    positions = layer.in_features // old_in
                in_features = layer.in_features if first else new_in * positions
                layer = nn.Linear(in_features, new_out, layer.bias is not None)
                positions = 1
            old_in, new_in = old_out, new_out
        elif isinstance(layer, nn.BatchNorm2d) and new_in is not None:
            layer = nn.BatchNorm2d(new_in, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        layers.append(layer)
    return nn.Sequential(*layers)


def _width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
