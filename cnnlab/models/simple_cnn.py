"""The one-convolution network that explains forward and backward propagation, and with batch norm.

conv 32@3x3 pad 1 -> ReLU -> max-pool 2 -> fc classes. On 1x28x28: 32x14x14 features.
`simple_cnn_bn` puts a batch norm between the conv and its ReLU.
"""

from torch import nn

from cnnlab.models.registry import classifier_head, conv_block, flat_features, register_model


def simple(in_shape: tuple[int, int, int], num_classes: int, dropout: float, *, batch_norm: bool, name: str) -> nn.Sequential:
    features = nn.Sequential(
        *conv_block(in_shape[0], 32, kernel_size=3, padding=1, batch_norm=batch_norm),  # (N, 32, H, W)
        nn.MaxPool2d(2),  # (N, 32, H/2, W/2)
        nn.Flatten(),
    )
    n_features = flat_features(features, in_shape, name)
    return nn.Sequential(*features, *classifier_head(n_features, (), num_classes, dropout=dropout))


@register_model("simple_cnn", "one 3x3 conv (32 filters), ReLU, 2x2 max-pool, one fc layer")
def simple_cnn(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return simple(in_shape, num_classes, dropout, batch_norm=False, name="simple_cnn")


@register_model("simple_cnn_bn", "simple_cnn with batch norm after its conv")
def simple_cnn_bn(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return simple(in_shape, num_classes, dropout, batch_norm=True, name="simple_cnn_bn")
