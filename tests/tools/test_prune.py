"""cnnlab prune: the sparsity it claims, a smaller channel-pruned model that loads as a normal run, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.models import create_model
from cnnlab.models.widths import layer_widths, with_widths
from cnnlab.tools import latency
from cnnlab.tools.export import ModelInfo
from cnnlab.tools.prune import narrowed
from cnnlab.train.checkpoint import load_checkpoint


@pytest.fixture(autouse=True)
def _few_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "REPEATS", {1: 2, 256: 2})
    monkeypatch.setattr(latency, "ROUNDS", 2)


def test_global_magnitude_pruning_zeroes_the_share_it_claims(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    status = main(["prune", str(trained_run), "--amount", "0.6", "--steps", "2", "--finetune-epochs", "1",
                   "--out", str(out), "--json"])  # fmt: skip
    assert status == 0
    state = load_checkpoint(out / "checkpoints" / "best.pt").model_state
    assert not any(name.endswith(("_orig", "_mask")) for name in state)  # made permanent
    weights = [w for name, w in state.items() if name.endswith("weight")]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * total)
    figures = json.loads((out / "prune.json").read_text())
    assert figures["after"]["weight_sparsity"] == pytest.approx(zeros / total)
    assert figures["before"]["weight_sparsity"] < 0.01
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] > 0.5


def test_channel_pruning_makes_a_smaller_model_that_evaluate_predict_and_export_take(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "narrow"
    assert main(["prune", str(trained_run), "--amount", "0.5", "--method", "channels", "--steps", "1",
                 "--finetune-epochs", "1", "--out", str(out)]) == 0  # fmt: skip
    checkpoint = load_checkpoint(out / "checkpoints" / "best.pt")
    assert checkpoint.model["widths"] == [3, 8, 60, 42]  # LeNet-5's [6, 16, 120, 84], halved
    figures = json.loads((out / "prune.json").read_text())
    assert figures["after"]["parameters"] < figures["before"]["parameters"] / 3
    assert figures["after"]["onnx_bytes"] < figures["before"]["onnx_bytes"] / 2
    image = tmp_path / "digit.png"
    Image.fromarray((torch.rand(28, 28) * 255).to(torch.uint8).numpy()).save(image)
    assert main(["evaluate", str(out)]) == 0
    assert main(["predict", str(out), str(image)]) == 0
    assert main(["export", str(out), "--format", "onnx,safetensors", "--json"]) == 0
    check = json.loads((out / "export" / "model.onnx.check.json").read_text())
    assert check["top1_agreement"] == 1.0
    info = ModelInfo.from_dict(json.loads((out / "export" / "model.json").read_text()), "model.json")
    assert info.widths == (3, 8, 60, 42)
    rebuilt = info.build_model(load_file(out / "export" / "model.safetensors"))  # from the exported files alone
    x = torch.randn(4, *info.in_shape)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), checkpoint.build_model()(x))


def test_widths_narrow_each_layer_to_its_own_width_in_steps(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "narrow"
    assert main(["prune", str(trained_run), "--method", "channels", "--widths", "3,8,120,21", "--steps", "2",
                 "--finetune-epochs", "1", "--out", str(out)]) == 0  # fmt: skip
    steps = [line for line in capsys.readouterr().out.splitlines() if "layer widths" in line]
    # Each step keeps the same share of what each layer has left: 6 -> 4 -> 3, 84 -> 42 -> 21; 120 stays.
    assert [line.split("-> ")[1] for line in steps] == ["[4, 11, 120, 42]", "[3, 8, 120, 21]"]
    assert load_checkpoint(out / "checkpoints" / "best.pt").model["widths"] == [3, 8, 120, 21]


def test_narrowing_removes_the_weakest_channels_and_the_inputs_that_read_them() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(narrowed(model, layer_widths(model, "lenet5"))(x), model(x))  # all kept: the same function
        # Channels that output nothing (a dead conv1 channel, a dead conv2 channel, a dead fc unit) are the weakest:
        # cutting them must leave the logits as they were, which holds only if the next layer lost the right inputs.
        for index, unit in ((0, 2), (3, 5), (7, 100)):
            model[index].weight[unit] = 0
            model[index].bias[unit] = 0
        smaller = narrowed(model, [5, 15, 119, 84])
        assert torch.allclose(smaller(x), model(x), atol=1e-5)


def test_widths_that_do_not_fit_the_model_are_refused() -> None:
    from cnnlab.errors import CnnlabError

    with pytest.raises(CnnlabError, match="do not fit"):
        with_widths(create_model("lenet5", (1, 28, 28), 10), [6, 16, 120])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--amount", "1.0"], "--amount must be in (0, 1)"),
        (["--amount", "0"], "--amount must be in (0, 1)"),
        (["--amount", "0.5", "--method", "random"], "unknown pruning method 'random'"),
        (["--widths", "4,8,120,84"], "--widths narrows layers: use it with --method channels"),
        (["--amount", "0.5", "--widths", "4,8,120,84", "--method", "channels"], "give --amount (the share removed) or"),
        (["--method", "channels"], "give --amount (the share removed) or"),
        (["--method", "channels", "--widths", "4,8,120"], "--widths 4,8,120 do not fit lenet5: give 4 widths"),
        (["--method", "channels", "--widths", "7,8,120,84"], "each from 1 to the layer's own (6,16,120,84)"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(trained_run: Path, capsys, args, message) -> None:
    assert main(["prune", str(trained_run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_run_without_a_best_checkpoint_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: lenet5\n")
    assert main(["prune", str(tmp_path / "run"), "--amount", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no checkpoints/best.pt" in err, err
