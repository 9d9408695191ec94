"""The named parts of a registered model: its head and its features.

Every registered model is an `nn.Sequential` whose last Linear layer maps
features to class logits: that layer is the head, the one a model trained on
other classes cannot reuse. The features are the top-level layers before the
first Linear (LeNet-5's convolutions and pools; all of a ResNet but its head):
what transfers from one dataset to another. Layers are named as in the
state_dict ("11" for LeNet-5's head, whose weights are "11.weight" and "11.bias").
"""

from __future__ import annotations

from torch import nn


def head_layer(model: nn.Module) -> str:
    """The name of `model`'s last Linear layer, the one that gives the logits (LeNet-5: "11")."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no Linear layer: registered models end in one")
    return linear[-1]


def feature_layers(model: nn.Module) -> list[str]:
    """The top-level layers with weights that come before the first Linear one (LeNet-5: ["0", "3"])."""
    names = []
    for name, child in model.named_children():
        if any(isinstance(module, nn.Linear) for module in child.modules()):
            break
        if any(True for _ in child.parameters()):
            names.append(name)
    return names


def layers_with_weights(model: nn.Module) -> list[str]:
    """Every top-level layer that holds parameters, in order (LeNet-5: ["0", "3", "7", "9", "11"])."""
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]
