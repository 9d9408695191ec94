"""The one-convolution network that explains forward and backward propagation.

conv 32@3x3 pad 1 -> ReLU -> max-pool 2 -> fc classes. On 1x28x28: 32x14x14 features.
"""

from torch import nn

from cnnlab.models.registry import flat_features, register_model


@register_model("simple_cnn", "one 3x3 conv (32 filters), ReLU, 2x2 max-pool, one fc layer")
def simple_cnn(in_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    features = nn.Sequential(
        nn.Conv2d(in_shape[0], 32, kernel_size=3, padding=1),  # (N, 32, H, W)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 32, H/2, W/2)
        nn.Flatten(),
    )
    return nn.Sequential(*features, nn.Linear(flat_features(features, in_shape, "simple_cnn"), num_classes))
