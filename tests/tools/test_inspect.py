"""`cnnlab inspect`'s layer table against independent counts: parameters, LeNet-5's multiply-adds by hand,
receptive fields from gradients; and its command line, errors included."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.cli import main
from cnnlab.models import all_models, create_model
from cnnlab.tools.inspect import WHOLE_IMAGE, layer_table, recurrent_mult_adds

# LeNet-5 on 1x28x28, by hand (docs/inspect.md): output values x weights each one multiplies.
LENET_MULT_ADDS = {
    "0": 6 * 24 * 24 * (1 * 5 * 5),  # conv1: 86,400
    "3": 16 * 8 * 8 * (6 * 5 * 5),  # conv2: 153,600
    "7": 120 * 256,  # fc1: 30,720
    "9": 84 * 120,  # fc2: 10,080
    "11": 10 * 84,  # fc3: 840
}


@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
def test_every_model_adds_up_to_its_parameters_and_to_the_whole_models_flop_count(name, in_shape):
    model = create_model(name, in_shape, 10).train()
    table = layer_table(model, in_shape)
    assert model.training  # the table is made in eval mode, and the mode put back
    assert table.total_parameters == sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *in_shape))
    # torch's counter skips the fused recurrent kernels; the table counts them by hand
    by_hand = sum(recurrent_mult_adds(m, in_shape[1]) for m in model.modules() if isinstance(m, (nn.RNN, nn.LSTM)))
    assert table.total_mult_adds == counter.get_total_flops() // 2 + by_hand
    modules = dict(model.named_modules())
    assert all(type(modules[r.name]).__name__ == r.type for r in table.rows)
    assert table.rows[-1].output_shape == (10,)


def test_lenet5_multiply_adds_are_the_hand_count_and_fields_grow_as_kernels_and_strides_say():
    table = layer_table(create_model("lenet5", (1, 28, 28), 10), (1, 28, 28))
    rows = {r.name: r for r in table.rows}
    assert {name: rows[name].mult_adds for name in LENET_MULT_ADDS} == LENET_MULT_ADDS
    assert table.total_mult_adds == sum(LENET_MULT_ADDS.values()) == 281_640
    assert [rows[n].output_shape for n in ("0", "2", "3", "5", "6")] == [(6, 24, 24), (6, 12, 12), (16, 8, 8), (16, 4, 4), (256,)]
    assert [rows[n].receptive_field for n in ("0", "1", "2", "3", "5", "7")] == [
        (5, 5), (5, 5), (6, 6), (14, 14), (16, 16), WHOLE_IMAGE,
    ]  # fmt: skip


def test_the_receptive_field_is_the_input_a_unit_depends_on():
    """A strided then a dilated convolution of ones: the centre unit's gradient is non-zero on exactly its field."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, bias=False), nn.Conv2d(1, 1, 3, dilation=2, bias=False))
    for conv in model:
        nn.init.ones_(conv.weight)
    (_, last) = layer_table(model, (1, 32, 32)).rows
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    out = model(x)  # (1, 1, 11, 11)
    out[0, 0, 5, 5].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert last.receptive_field == (int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)) == (11, 11)


def test_residual_blocks_are_rows_of_their_own_after_their_layers():
    table = layer_table(create_model("resnet8", (1, 28, 28), 10), (1, 28, 28))
    names = [r.name for r in table.rows]
    assert names.index("4.body.0") < names.index("4.shortcut.0") < names.index("4")
    block = table.rows[names.index("4")]
    assert (block.type, block.parameters, block.output_shape) == ("Residual", 0, (32, 14, 14))
    body = table.rows[names.index("4.body.4")].receptive_field
    assert block.receptive_field == body  # the sum sees what its wider branch sees


def test_inspect_prints_a_models_table_and_json(capsys):
    assert main(["inspect", "lenet5"]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "44,426" in text and "281,640" in text
    assert main(["inspect", "simple_cnn", "--input", "3x32x32", "--classes", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = create_model("simple_cnn", (3, 32, 32), 4)
    assert data["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert data["layers"][0] == {"name": "0", "type": "Conv2d", "output_shape": [32, 32, 32], "parameters": 896,
                                 "mult_adds": 32 * 32 * 32 * 27, "receptive_field": [3, 3]}  # fmt: skip


def test_inspect_reads_a_runs_model(trained_run, capsys):
    assert main(["inspect", str(trained_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "lenet5" and data["input_shape"] == [1, 28, 28] and data["total_mult_adds"] == 281_640


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuch"], "'nosuch' is neither a run directory, a checkpoint nor a model name"),
        (["lenet5", "--input", "1x28"], "--input must look like 1x28x28"),
        (["lenet5", "--input", "1x4x4"], "cannot take 4x4 images"),
        (["lenet5", "--image", "x.png"], "--image needs a trained run"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["inspect", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_folder_without_a_checkpoint_is_one_line_and_exit_2(tmp_path, trained_run, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoints/best.pt" in err and err.count("\n") == 1
    assert main(["inspect", str(trained_run), "--input", "1x32x32"]) == 2
    assert "a run's model takes the input shape it was trained on" in capsys.readouterr().err


def test_an_lstm_reading_28_rows_is_counted_by_its_formula():
    table = layer_table(create_model("lstm", (1, 28, 28), 10), (1, 28, 28))
    (lstm,) = [r for r in table.rows if r.type == "LSTM"]
    assert lstm.mult_adds == 28 * 4 * 128 * (28 + 128)  # rows x gates x hidden x (input + hidden)
