"""The loop's options end to end: early stopping, L1, dropout, MSE, precision; each exact under --resume."""

import csv
import json

import pytest
import torch
import yaml

from cnnlab.cli import main
from cnnlab.models import create_model
from cnnlab.train import distributed
from cnnlab.train.checkpoint import load_checkpoint
from cnnlab.train.evaluate import Evaluation

FAST = ["--model", "simple_cnn", "--batch-size", "128", "--seed", "1", "--no-recipe", "--schedule", "step"]


def train(runs, name, *flags):
    return main(["train", "--runs-dir", str(runs), "--name", name, *FAST, *flags])


def rows(run):
    return list(csv.DictReader(open(run / "metrics.csv")))


@pytest.fixture
def scripted_validation(monkeypatch):
    """Validation accuracies from a script, one per epoch in order.

    Once the script is used up, evaluation is real again: the test split after the last epoch is
    really evaluated, and an epoch that should not have run sees no scripted value.
    """
    script = []
    real_evaluate = distributed.evaluate

    def scripted_evaluate(model, data, normalization):
        if not script:
            return real_evaluate(model, data, normalization)
        return Evaluation(loss=1.0, accuracy=script.pop(0), predictions=torch.zeros(0, dtype=torch.int64))

    monkeypatch.setattr(distributed, "evaluate", scripted_evaluate)
    return script


def test_patience_stops_at_the_right_epoch_and_the_best_epoch_is_tested(tmp_path, scripted_validation):
    # Best at epoch 2; epochs 3 and 4 do not beat it by more than 0.01 (0.705 would beat it by 0.005 only).
    scripted_validation += [0.5, 0.7, 0.705, 0.6]
    assert train(tmp_path, "r", "--epochs", "6", "--patience", "2", "--min-delta", "0.01") == 0
    run = tmp_path / "r"
    assert [int(r["epoch"]) for r in rows(run)] == [1, 2, 3, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"]["reason"] == "early_stopping" and summary["stopped"]["epoch"] == 4
    assert "for 2 epochs after epoch 2" in summary["stopped"]["detail"]
    # best.pt follows the best validation accuracy (0.705, epoch 3), and it is the checkpoint tested.
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best.epoch == summary["best_epoch"] == 3
    assert main(["train", "--resume", str(run)]) == 0  # a stopped run stays stopped: nothing more to train
    assert len(rows(run)) == 4


def test_without_patience_every_epoch_runs_and_the_summary_says_so(tmp_path, scripted_validation):
    scripted_validation += [0.9, 0.5, 0.5]
    assert train(tmp_path, "r", "--epochs", "3") == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["stopped"] == {
        "reason": "completed", "epoch": 3, "detail": "all 3 epochs trained"
    }


def test_early_stopping_is_exact_under_resume(tmp_path, scripted_validation):
    """Interrupted after epoch 2 of a run that stops early at epoch 4: resumed, it stops at epoch 4 too."""
    accuracies = [0.5, 0.8, 0.7, 0.6]
    scripted_validation[:] = accuracies
    assert train(tmp_path, "straight", "--epochs", "5", "--patience", "2") == 0
    scripted_validation[:] = accuracies[:2]
    assert train(tmp_path, "split", "--epochs", "2", "--patience", "2") == 0
    scripted_validation[:] = accuracies[2:]
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "5"]) == 0
    for run in ("straight", "split"):
        assert len(rows(tmp_path / run)) == 4
        assert json.loads((tmp_path / run / "summary.json").read_text())["stopped"]["epoch"] == 4


def test_every_toolbox_option_is_saved_and_exact_under_resume(tmp_path):
    options = ["--dropout", "0.3", "--l1", "1e-4", "--loss", "mse", "--patience", "5", "--min-delta", "0.001",
               "--precision", "bf16", "--lr", "0.05"]  # fmt: skip
    assert train(tmp_path, "straight", "--epochs", "2", *options) == 0
    assert train(tmp_path, "split", "--epochs", "1", *options) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    straight, split = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "split"))
    for key in straight.model_state:
        assert torch.equal(straight.model_state[key], split.model_state[key]), key
    config = yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())
    assert (config["dropout"], config["l1"], config["loss"], config["patience"], config["min_delta"], config["precision"]) == (
        0.3, 1e-4, "mse", 5, 0.001, "bf16"
    )
    assert straight.model["dropout"] == 0.3


def test_the_l1_column_is_lambda_times_the_sum_of_absolute_weights(tmp_path):
    assert train(tmp_path, "r", "--epochs", "1", "--l1", "0.001") == 0
    (row,) = rows(tmp_path / "r")
    weights = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt").model_state
    expected = 0.001 * sum(float(w.double().abs().sum()) for w in weights.values() if w.dim() > 1)
    assert float(row["l1_penalty"]) == pytest.approx(expected, rel=1e-5)
    assert train(tmp_path, "plain", "--epochs", "1") == 0
    assert "l1_penalty" not in rows(tmp_path / "plain")[0]
    # With frozen layers, the column is the term the loss adds: over the trained weights only.
    assert train(tmp_path, "frozen", "--epochs", "1", "--l1", "0.001", "--init-from", str(tmp_path / "r"),
                 "--freeze", "features") == 0  # fmt: skip
    (row,) = rows(tmp_path / "frozen")
    tuned = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt").model_state
    trained = [w for key, w in tuned.items() if w.dim() > 1 and not torch.equal(w, weights[key])]
    assert 0 < len(trained) < sum(w.dim() > 1 for w in tuned.values())
    expected = 0.001 * sum(float(w.double().abs().sum()) for w in trained)
    assert float(row["l1_penalty"]) == pytest.approx(expected, rel=1e-5)


def test_a_dropout_model_is_rebuilt_by_evaluate_and_export(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1", "--dropout", "0.5") == 0
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert main(["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "model.json").read_text())
    from safetensors.torch import load_file

    model = create_model(info["name"], tuple(info["in_shape"]), len(info["classes"]), dropout=info["dropout"])
    model.load_state_dict(load_file(tmp_path / "export" / "model.safetensors"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--patience", "-1"], "--patience must be >= 0"),
        (["--dropout", "1"], r"--dropout must be in \[0, 1\)"),
        (["--l1=-1e-3"], "--l1 must be >= 0"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA GPU"),
        (["--precision", "bf16", "--engine", "manual"], "--precision bf16 needs --engine autograd"),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--min-delta", "0.01"], "--min-delta needs --patience"),
        (["--patience", "3", "--val-fraction", "0"], "--patience watches the validation accuracy"),
    ],
)
def test_bad_toolbox_options_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    assert train(tmp_path, "r", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "r").exists()
