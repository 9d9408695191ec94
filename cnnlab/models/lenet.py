"""LeNet-5 (LeCun et al., 1998), as the classic tutorial builds it for MNIST.

C1 conv 6@5x5 -> ReLU -> S2 max-pool 2 -> C3 conv 16@5x5 -> ReLU -> S4 max-pool 2
-> C5 fc 120 -> ReLU -> F6 fc 84 -> ReLU -> output fc num_classes.
On 1x28x28 input the features are 16x4x4 = 256 numbers; other sizes adapt.
"""

from torch import nn

from cnnlab.models.registry import flat_features, register_model


@register_model("lenet5", "LeNet-5 (LeCun et al., 1998): two 5x5 convs (6, 16) with max-pooling, fc 120-84-classes")
def lenet5(in_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    channels = in_shape[0]
    features = nn.Sequential(
        nn.Conv2d(channels, 6, kernel_size=5),  # (N, 6, H-4, W-4)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 6, (H-4)/2, (W-4)/2)
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 16, 4, 4) for 28x28 input
        nn.Flatten(),
    )
    n_features = flat_features(features, in_shape, "lenet5")
    return nn.Sequential(
        *features,
        nn.Linear(n_features, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )
