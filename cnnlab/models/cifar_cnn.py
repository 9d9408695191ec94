"""The small CIFAR network: two convolution blocks and a two-layer classifier.

conv 16@3x3 pad 1 -> ReLU -> max-pool 2 -> conv 32@3x3 pad 1 -> ReLU -> max-pool 2
-> fc 64 -> ReLU -> fc classes. On 3x32x32 the features are 32x8x8 = 2048 numbers.
"""

from torch import nn

from cnnlab.models.registry import flat_features, register_model


@register_model("cifar_cnn", "small CIFAR net: two 3x3 convs (16, 32) with max-pooling, fc 64-classes")
def cifar_cnn(in_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    features = nn.Sequential(
        nn.Conv2d(in_shape[0], 16, kernel_size=3, padding=1),  # (N, 16, H, W)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 16, H/2, W/2)
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 32, H/4, W/4)
        nn.Flatten(),
    )
    n_features = flat_features(features, in_shape, "cifar_cnn")
    return nn.Sequential(*features, nn.Linear(n_features, 64), nn.ReLU(), nn.Linear(64, num_classes))
