"""The small CIFAR network: two convolution blocks and a two-layer classifier, and with batch norm.

conv 16@3x3 pad 1 -> ReLU -> max-pool 2 -> conv 32@3x3 pad 1 -> ReLU -> max-pool 2
-> fc 64 -> ReLU -> fc classes. On 3x32x32 the features are 32x8x8 = 2048 numbers.
`cifar_cnn_bn` puts a batch norm between every hidden layer and its ReLU.
"""

from torch import nn

from cnnlab.models.registry import classifier_head, conv_block, flat_features, register_model


def cifar(in_shape: tuple[int, int, int], num_classes: int, dropout: float, *, batch_norm: bool, name: str) -> nn.Sequential:
    features = nn.Sequential(
        *conv_block(in_shape[0], 16, kernel_size=3, padding=1, batch_norm=batch_norm),  # (N, 16, H, W)
        nn.MaxPool2d(2),  # (N, 16, H/2, W/2)
        *conv_block(16, 32, kernel_size=3, padding=1, batch_norm=batch_norm),
        nn.MaxPool2d(2),  # (N, 32, H/4, W/4)
        nn.Flatten(),
    )
    n_features = flat_features(features, in_shape, name)
    return nn.Sequential(*features, *classifier_head(n_features, (64,), num_classes, dropout=dropout, batch_norm=batch_norm))


@register_model("cifar_cnn", "small CIFAR net: two 3x3 convs (16, 32) with max-pooling, fc 64-classes")
def cifar_cnn(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return cifar(in_shape, num_classes, dropout, batch_norm=False, name="cifar_cnn")


@register_model("cifar_cnn_bn", "cifar_cnn with batch norm after every conv and hidden fc layer")
def cifar_cnn_bn(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return cifar(in_shape, num_classes, dropout, batch_norm=True, name="cifar_cnn_bn")
