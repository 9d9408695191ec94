"""LeNet-5 (LeCun et al., 1998), as the classic tutorial builds it for MNIST, and with batch norm.

C1 conv 6@5x5 -> ReLU -> S2 max-pool 2 -> C3 conv 16@5x5 -> ReLU -> S4 max-pool 2
-> C5 fc 120 -> ReLU -> F6 fc 84 -> ReLU -> output fc num_classes.
On 1x28x28 input the features are 16x4x4 = 256 numbers; other sizes adapt.
`lenet5_bn` puts a batch norm between every hidden layer and its ReLU (Ioffe and Szegedy, 2015).
"""

from torch import nn

from cnnlab.models.registry import classifier_head, conv_block, flat_features, register_model


def lenet(in_shape: tuple[int, int, int], num_classes: int, dropout: float, *, batch_norm: bool, name: str) -> nn.Sequential:
    features = nn.Sequential(
        *conv_block(in_shape[0], 6, kernel_size=5, batch_norm=batch_norm),  # (N, 6, H-4, W-4)
        nn.MaxPool2d(2),  # (N, 6, (H-4)/2, (W-4)/2)
        *conv_block(6, 16, kernel_size=5, batch_norm=batch_norm),
        nn.MaxPool2d(2),  # (N, 16, 4, 4) for 28x28 input
        nn.Flatten(),
    )
    n_features = flat_features(features, in_shape, name)
    return nn.Sequential(*features, *classifier_head(n_features, (120, 84), num_classes, dropout=dropout, batch_norm=batch_norm))


@register_model("lenet5", "LeNet-5 (LeCun et al., 1998): two 5x5 convs (6, 16) with max-pooling, fc 120-84-classes")
def lenet5(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return lenet(in_shape, num_classes, dropout, batch_norm=False, name="lenet5")


@register_model("lenet5_bn", "LeNet-5 with batch norm after every conv and hidden fc layer")
def lenet5_bn(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return lenet(in_shape, num_classes, dropout, batch_norm=True, name="lenet5_bn")
