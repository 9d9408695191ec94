"""Recurrent baselines that read an image row by row, top to bottom.

Each of the H rows (its C*W values, channels side by side) is one time step;
the classifier sees only the last hidden state, after the whole image:

    image (N, C, H, W) -> rows (N, H, C*W) -> RNN or LSTM, hidden 128 -> last state (N, 128) -> fc classes

`rnn` is the plain tanh cell, `lstm` the gated one. They are the baselines the
convolutional models are measured against: a recurrent net has to carry what it
saw at row 3 through 25 more steps to classify at the end, where a convolution
sees each neighbourhood at once.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.models.registry import classifier_head, register_model

HIDDEN = 128  # hidden units; docs/backprop.md ("Backpropagation through time") has the runs behind it


class RowReader(nn.Module):
    """Reads each image row by row with `rnn` (a one-layer, batch-first nn.RNN or nn.LSTM), keeps its last state.

    x: (N, C, H, W) -> rows (N, H, C*W), row h = time step h -> h_H: (N, hidden).
    The state starts at zero for every image.
    """

    def __init__(self, rnn: nn.RNN | nn.LSTM) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        outputs = self.rnn(rows)[0]  # (N, H, hidden): the states after each row
        return outputs[:, -1]


def row_reader(
    rnn_type: type[nn.RNN | nn.LSTM], in_shape: tuple[int, int, int], num_classes: int, dropout: float
) -> nn.Sequential:
    channels, _, width = in_shape
    rnn = rnn_type(channels * width, HIDDEN, batch_first=True)
    return nn.Sequential(RowReader(rnn), *classifier_head(HIDDEN, (), num_classes, dropout=dropout))


@register_model("rnn", "plain RNN (tanh, 128 hidden) reading the image row by row, fc on its last state")
def rnn(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return row_reader(nn.RNN, in_shape, num_classes, dropout)


@register_model("lstm", "LSTM (128 hidden) reading the image row by row, fc on its last state")
def lstm(in_shape: tuple[int, int, int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    return row_reader(nn.LSTM, in_shape, num_classes, dropout)
