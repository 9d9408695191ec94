"""A small ResNet for 28x28 and 32x32 images (He et al., 2016).

stem conv 16@3x3 -> BN -> ReLU, then three stages of basic blocks at 16, 32 and
64 channels (the last two halve the resolution), global average pool, fc classes.
`resnet8` has one block a stage, `resnet20` three, as in the paper's CIFAR nets.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.models.registry import classifier_head, register_model


class Residual(nn.Module):
    """y = relu(body(x) + shortcut(x)): the skip connection that lets deep nets train.

    body and shortcut are nn.Sequential; an empty shortcut is the identity.
    x: (N, C, H, W) -> y: (N, C', H', W'), both branches giving the same shape.
    """

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def basic_block(in_channels: int, out_channels: int, stride: int) -> Residual:
    """Two 3x3 convs with batch norm; a 1x1 conv shortcut where the shape changes."""
    body = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )
    shortcut = nn.Sequential()
    if stride != 1 or in_channels != out_channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    return Residual(body, shortcut)


def resnet(in_shape: tuple[int, int, int], num_classes: int, blocks_per_stage: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_shape[0], 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    channels = 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(basic_block(channels, width, stride))
            channels = width
    # (N, 64, H/4, W/4) -> (N, 64): averaging makes the head independent of the image size.
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), *classifier_head(channels, (), num_classes, dropout=dropout)]
    return nn.Sequential(*layers)


@register_model("resnet8", "ResNet-8: 3 stages of 1 residual block (16-32-64 channels), batch norm")
def resnet8(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return resnet(in_shape, num_classes, blocks_per_stage=1, dropout=dropout)


@register_model("resnet20", "ResNet-20: 3 stages of 3 residual blocks (16-32-64 channels), batch norm")
def resnet20(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return resnet(in_shape, num_classes, blocks_per_stage=3, dropout=dropout)
