"""The row-by-row RNN and LSTM: what they read, and a trained one through evaluate, predict and export."""

import copy
import json

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from torch import nn

from cnnlab.cli import main
from cnnlab.config import OptimConfig, TrainConfig
from cnnlab.data.sources import load_splits
from cnnlab.engine import make_engine
from cnnlab.fast.slices import splittable
from cnnlab.models import count_parameters, create_model
from cnnlab.tools.export import export_run
from cnnlab.tools.predict import Predictor


@pytest.mark.parametrize("name, cell_type", [("rnn", nn.RNNCell), ("lstm", nn.LSTMCell)])
def test_each_row_is_one_step_and_the_last_state_is_classified(name, cell_type):
    """The model equals a loop of the cell over the rows, a row's channels side by side, then fc."""
    torch.manual_seed(0)
    model = create_model(name, (3, 5, 4), 6)  # 5 steps of 3*4 values
    rnn, fc = model[0].rnn, model[1]
    cell = cell_type(12, rnn.hidden_size)
    for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, key).data.copy_(getattr(rnn, f"{key}_l0"))
    x = torch.randn(2, 3, 5, 4)
    state = None
    for row in range(5):
        step = torch.cat([x[:, channel, row] for channel in range(3)], dim=1)  # (2, 12)
        state = cell(step, state)
    h = state[0] if isinstance(state, tuple) else state
    torch.testing.assert_close(model(x), fc(h))


def test_the_lstm_has_128_hidden_units_and_its_parameter_count():
    model = create_model("lstm", (1, 28, 28), 10)
    assert model[0].rnn.hidden_size == 128
    assert count_parameters(model) == 4 * 128 * (28 + 128 + 2) + 128 * 10 + 10 == 82_186


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_a_step_split_into_slices_equals_the_whole_batchs(engine):
    """Each image starts from a zero state, so the readers may be split across cores (cnnlab.fast.slices)."""
    torch.manual_seed(0)
    model = create_model("lstm", (1, 12, 12), 10).double()
    assert splittable(model)
    config = TrainConfig(engine=engine, optim=OptimConfig(name="adam", lr=1e-2))
    whole, sliced = make_engine(model, config, slices=1), make_engine(copy.deepcopy(model), config, slices=2)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 12, 12, dtype=torch.float64, generator=generator), torch.randint(10, (128,))
    for step in (whole, sliced):
        step.train_step(x, y, 1e-2)
    for (key, a), b in zip(whole.model.state_dict().items(), sliced.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=key)


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    """An LSTM trained by the hand-written engine on digits for two epochs."""
    runs = tmp_path_factory.mktemp("runs")
    argv = ["train", "--model", "lstm", "--engine", "manual", "--epochs", "2", "--optimizer", "adam", "--lr", "5e-3",
            "--runs-dir", str(runs), "--name", "lstm", "--json"]  # fmt: skip
    assert main(argv) == 0
    return runs / "lstm"


def test_a_run_trained_by_the_manual_engine_evaluates_to_its_recorded_accuracy(lstm_run, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(lstm_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((lstm_run / "summary.json").read_text())
    assert result["test_accuracy"] == summary["test_accuracy"] > 0.3  # ten classes: chance is 0.1


def test_predict_classifies_image_files(lstm_run, tmp_path):
    test = load_splits("digits", None, 0.1, 0).test
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(test.images[i, 0].numpy()).save(paths[-1])
    predictions = Predictor.load(lstm_run).predict_files(paths, top_k=3)
    assert len(predictions) == 4 and all(len(p.classes) == 3 for p in predictions)


def test_onnx_export_is_an_lstm_node_that_matches_pytorch(lstm_run, tmp_path):
    result = export_run(lstm_run, ["onnx"], tmp_path)
    assert result.onnx_check["top1_agreement"] == 1.0 and result.onnx_check["max_abs_logit_diff"] < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    model = Predictor.load(lstm_run).model
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(["logits"], {"images": x.numpy()})[0], model(x).numpy(), atol=1e-4)
