"""Transfer learning: --init-from loads, adapts or refuses; --freeze keeps layers bit for bit; resume stays exact."""

import pytest
import torch
import yaml

from cnnlab.cli import main
from cnnlab.data.dataset import Normalization
from cnnlab.data.sources import FASHION_CLASSES
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cnnlab.train.transfer import Pretrained, freeze_layers, initialise_from, read_pretrained

DIGITS = tuple(str(d) for d in range(10))


def save_source(folder, model_name="lenet5", in_shape=(1, 28, 28), classes=FASHION_CLASSES, seed=7):
    """A run directory whose best checkpoint holds a freshly initialised `model_name`: the weights to start from."""
    torch.manual_seed(seed)
    model = create_model(model_name, in_shape, len(classes))
    (folder / "checkpoints").mkdir(parents=True)
    checkpoint = Checkpoint(
        model={"name": model_name, "in_shape": list(in_shape), "num_classes": len(classes)},
        model_state=model.state_dict(),
        normalization=Normalization((0.5,) * in_shape[0], (0.25,) * in_shape[0]),
        classes=tuple(classes),
        dataset="fashion-mnist",
    )
    save_checkpoint(folder / "checkpoints" / "best.pt", checkpoint)
    return folder, model.state_dict()


def fine_tune(tmp_path, mnist_root, name, *flags):
    """Train on the tiny hand-built mnist (10 classes '0'..'9', 1x28x28) into tmp_path/runs/name."""
    argv = ["train", "--dataset", "mnist", "--data-dir", str(mnist_root), "--runs-dir", str(tmp_path / "runs"),
            "--name", name, "--batch-size", "16", "--seed", "1", "--schedule", "step", *flags]  # fmt: skip
    return main(argv)


def last_weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt").model_state


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_frozen_features_stay_bit_identical_while_the_rest_trains_and_the_head_is_new(
    tmp_path, mnist_root, capsys, engine
):
    source, initial = save_source(tmp_path / "source")
    flags = ["--init-from", str(source), "--freeze", "features", "--head-lr-mult", "5", "--engine", engine]
    assert fine_tune(tmp_path, mnist_root, "tuned", "--epochs", "2", *flags) == 0
    # fashion-mnist's ten classes are not mnist's ten: the head starts afresh
    line = f"weights from {source} (lenet5 trained on fashion-mnist, 10 classes): 8 of 10 tensors; new head (layer 11)"
    assert line in capsys.readouterr().out
    tuned = last_weights(tmp_path / "runs" / "tuned")
    for key in ("0.weight", "0.bias", "3.weight", "3.bias"):  # LeNet-5's two convolutions: its features
        assert torch.equal(tuned[key], initial[key]), key
    assert not torch.equal(tuned["7.weight"], initial["7.weight"])  # fc 120 is not frozen: it trained
    config = yaml.safe_load((tmp_path / "runs" / "tuned" / "config.yaml").read_text())
    assert config["init_from"] == str(source) and config["freeze"] == "features"
    assert config["optim"]["head_lr_mult"] == 5.0


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_a_transfer_run_with_parameter_groups_resumes_exactly(tmp_path, mnist_root, engine):
    """2 epochs straight == 1 epoch, then --resume: bit-identical weights and optimizer state, with
    frozen layers, a head learning-rate multiplier and no decay on biases (several groups)."""
    source, _ = save_source(tmp_path / "source")
    flags = ["--init-from", str(source), "--freeze", "0", "--head-lr-mult", "3", "--no-bias-decay",
             "--optimizer", "adamw", "--lr", "0.01", "--engine", engine]  # fmt: skip
    assert fine_tune(tmp_path, mnist_root, "straight", "--epochs", "2", *flags) == 0
    assert fine_tune(tmp_path, mnist_root, "split", "--epochs", "1", *flags) == 0
    assert main(["train", "--resume", str(tmp_path / "runs" / "split"), "--epochs", "2"]) == 0
    straight = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "runs" / "split" / "checkpoints" / "last.pt")
    for key, value in straight.model_state.items():
        assert torch.equal(value, split.model_state[key]), key
    assert repr(straight.optimizer_state) == repr(split.optimizer_state)


def test_the_head_is_kept_when_the_classes_are_the_same(tmp_path):
    _, initial = save_source(tmp_path / "source", classes=DIGITS)
    model = create_model("lenet5", (1, 28, 28), 10)
    line = initialise_from(model, read_pretrained(str(tmp_path / "source")), model_name="lenet5", classes=DIGITS)
    assert "10 of 10 tensors" in line and "new head" not in line
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_another_class_count_gets_a_new_head_of_the_right_size(tmp_path):
    _, initial = save_source(tmp_path / "source", classes=("a", "b", "c"))
    model = create_model("lenet5", (1, 28, 28), 5)
    fresh = model.state_dict()["11.weight"].clone()
    pretrained = read_pretrained(str(tmp_path / "source"))
    line = initialise_from(model, pretrained, model_name="lenet5", classes=tuple("vwxyz"))
    assert "new head (layer 11) for 5 classes" in line
    assert torch.equal(model.state_dict()["11.weight"], fresh) and fresh.shape == (5, 84)
    assert torch.equal(model.state_dict()["9.weight"], initial["9.weight"])


@pytest.mark.parametrize(("source_channels", "channels"), [(1, 3), (3, 1)])
def test_a_grey_model_takes_colour_images_and_back_with_the_same_response_to_grey_ones(
    tmp_path, source_channels, channels
):
    """The first convolution's weights are spread over the new channels (or summed), so an image
    whose channels are all equal gives the same logits as the original model gives its grey version."""
    save_source(tmp_path / "source", in_shape=(source_channels, 28, 28), classes=DIGITS)
    original = load_checkpoint(tmp_path / "source" / "checkpoints" / "best.pt").build_model()
    model = create_model("lenet5", (channels, 28, 28), 10)
    line = initialise_from(model, read_pretrained(str(tmp_path / "source")), model_name="lenet5", classes=DIGITS)
    assert f"first convolution spread from {source_channels} to {channels} channels" in line
    grey = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        expected = original(grey.expand(-1, source_channels, -1, -1))
        got = model.eval()(grey.expand(-1, channels, -1, -1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_weights_exported_as_safetensors_load_like_the_run(tmp_path):
    pytest.importorskip("safetensors", reason="the export extra is part of dev")
    from cnnlab.tools.export import export_run

    source, initial = save_source(tmp_path / "source", classes=DIGITS)
    exported = export_run(source, formats=("safetensors",)).files[0].path
    pretrained = read_pretrained(str(exported))
    assert (pretrained.model_name, pretrained.in_shape, pretrained.classes) == ("lenet5", (1, 28, 28), DIGITS)
    model = create_model("lenet5", (1, 28, 28), 10)
    initialise_from(model, pretrained, model_name="lenet5", classes=DIGITS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_a_safetensors_file_without_cnnlab_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(create_model("lenet5", (1, 28, 28), 10).state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(CnnlabError, match="no cnnlab metadata"):
        read_pretrained(str(tmp_path / "plain.safetensors"))


def test_frozen_batch_norms_keep_their_running_statistics(tmp_path):
    """ResNet-8 with its features frozen: a training-mode forward leaves every buffer as loaded."""
    model = create_model("resnet8", (1, 16, 16), 10)
    frozen = freeze_layers(model, "features", model_name="resnet8")
    assert "1.weight" in frozen and not any(name.startswith("8.") for name in frozen)  # 8 is the head
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()(torch.randn(8, 1, 16, 16))
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_images_of_another_size_are_refused_with_the_shapes(tmp_path):
    save_source(tmp_path / "source", classes=DIGITS)
    model = create_model("lenet5", (1, 32, 32), 10)
    expected = r"its 7.weight has shape \(120, 256\) and this model's \(120, 400\).*trained on 1x28x28 images"
    with pytest.raises(CnnlabError, match=expected):
        initialise_from(model, read_pretrained(str(tmp_path / "source")), model_name="lenet5", classes=DIGITS)


def test_three_to_four_channels_is_refused():
    state = create_model("lenet5", (3, 28, 28), 10).state_dict()
    pretrained = Pretrained("src", "lenet5", (3, 28, 28), DIGITS, "cifar", state)
    with pytest.raises(CnnlabError, match="only grey to colour or colour to grey"):
        initialise_from(create_model("lenet5", (4, 28, 28), 10), pretrained, model_name="lenet5", classes=DIGITS)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "resnet8"], "holds a lenet5 and this run trains a resnet8: pass --model lenet5"),
        (["--freeze", "features,12"], "--freeze 12: lenet5 has no layer '12' with weights; choose features or among"),
        (["--freeze", "0,3,5,7,9,11"], "no layer '5'"),
        (["--freeze", "0,3,7,9,11"], "leaves lenet5 nothing to train"),
        (["--freeze", ","], "name layers separated by commas"),
        (["--head-lr-mult", "0"], "--head-lr-mult must be positive"),
    ],
)
def test_bad_transfer_options_are_one_line_and_exit_2(tmp_path, mnist_root, capsys, flags, message):
    source, _ = save_source(tmp_path / "source")
    assert fine_tune(tmp_path, mnist_root, "bad", "--epochs", "1", "--init-from", str(source), *flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad").exists()


def test_freeze_without_init_from_and_a_missing_source_are_refused(tmp_path, mnist_root, capsys):
    assert fine_tune(tmp_path, mnist_root, "bad", "--freeze", "features") == 2
    assert "--freeze needs --init-from" in capsys.readouterr().err
    assert fine_tune(tmp_path, mnist_root, "bad", "--init-from", str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err
