"""How a run's options are resolved: defaults, then the tuned recipe, then a config file, then flags."""

import re

import pytest

from cnnlab.config import RECIPES, TrainConfig, recipe_for, resolve, resolve_config
from cnnlab.errors import CnnlabError


def test_a_recipe_applies_to_its_model_and_dataset_only():
    tuned = resolve_config({"dataset": "fashion-mnist"})
    assert (tuned.batch_size, tuned.epochs, tuned.optim.lr, tuned.augment.flip) == (384, 30, 0.2, True)
    assert tuned.optim.momentum == TrainConfig().optim.momentum  # the rest of its section stays default
    for other in ({"dataset": "mnist"}, {"dataset": "fashion-mnist", "model": "simple_cnn"}, {"model": "resnet8"}):
        config = resolve_config(other)
        assert (config.batch_size, config.epochs, config.optim.lr) == (128, 10, 0.1), other


def test_later_layers_override_the_recipe_key_by_key():
    file_options = {"dataset": "fashion-mnist", "optim": {"lr": 0.05, "schedule": "cosine"}}
    flags = {"batch_size": 64, "optim": {"schedule": "step"}}
    config = resolve_config(file_options, flags)
    assert config.batch_size == 64  # the flag, over the recipe's 384
    assert config.epochs == 30  # the recipe, where nothing overrides it
    assert (config.optim.lr, config.optim.schedule) == (0.05, "step")


def test_the_dataset_can_come_from_any_layer():
    assert resolve_config({}, {"dataset": "fashion-mnist"}).batch_size == 384
    assert resolve_config({"dataset": "fashion-mnist"}, {"dataset": "mnist"}).batch_size == 128
    assert resolve_config({}).batch_size == RECIPES[("lenet5", "digits")]["batch_size"]  # the default dataset's


def test_every_recipe_is_a_valid_config_for_its_model_and_dataset():
    for (model, dataset), recipe in RECIPES.items():
        assert recipe_for(model, dataset) == recipe
        config = resolve_config({"model": model, "dataset": dataset})  # validated inside: raises if not
        assert config.model == model and config.dataset == dataset


def test_a_mistake_in_a_layer_is_named():
    with pytest.raises(CnnlabError, match="unknown option"):
        resolve_config({"batch": 3})


def test_the_recipe_can_be_left_out():
    plain = resolve_config({"dataset": "fashion-mnist"}, {"epochs": 3}, recipe=False)
    assert (plain.batch_size, plain.epochs, plain.optim.lr) == (128, 3, 0.1)


def test_an_empty_section_in_a_file_keeps_the_recipe():
    config = resolve_config({"dataset": "fashion-mnist", "optim": None})
    assert config.optim.lr == RECIPES[("lenet5", "fashion-mnist")]["optim"]["lr"]


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"optim": {"lr": -1.0}}, "--lr must be positive"),
        ({"augment": {"rotate": 270.0}}, "rotation must be in [0, 180]"),
    ],
)
def test_the_resolved_config_is_validated_already(layer, message):
    with pytest.raises(CnnlabError, match=re.escape(message)):
        resolve_config(layer)


def test_resolution_names_the_recipe_options_in_effect_and_the_overridden_ones():
    resolution = resolve({"optim": {"lr": 0.01}}, {"epochs": 3})
    recipe = RECIPES[("lenet5", "digits")]
    assert resolution.recipe_applied == {"batch_size": recipe["batch_size"], "augment.translate": 0.1}
    assert resolution.recipe_overridden == {"epochs": (recipe["epochs"], 3), "optim.lr": (recipe["optim"]["lr"], 0.01)}
    assert (resolution.config.epochs, resolution.config.optim.lr) == (3, 0.01)


def test_a_layer_repeating_a_recipe_value_leaves_it_applied():
    resolution = resolve({"epochs": RECIPES[("lenet5", "digits")]["epochs"]})
    assert "epochs" in resolution.recipe_applied and not resolution.recipe_overridden


def test_without_a_recipe_nothing_is_applied_or_overridden():
    for resolution in (resolve({"epochs": 3}, recipe=False), resolve({"dataset": "mnist", "epochs": 3})):
        assert resolution.recipe_applied == {} and resolution.recipe_overridden == {}


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"optim": {"lr": float("inf")}}, "--lr must be a finite number, got inf"),
        ({"optim": {"lr": float("nan")}}, "--lr must be a finite number, got nan"),
        ({"optim": {"grad_clip": float("inf")}}, "--grad-clip must be a finite number, got inf"),
        ({"optim": {"warmup_fraction": float("nan")}}, "--warmup must be a finite number"),
        ({"optim": {"betas": [0.9, float("inf")]}}, "optim.betas must be a finite number"),
        ({"label_smoothing": float("-inf")}, "--label-smoothing must be a finite number, got -inf"),
        ({"augment": {"translate": float("nan")}}, "--translate must be a finite number"),
    ],
)
def test_non_finite_values_are_refused_by_name(layer, message):
    with pytest.raises(CnnlabError, match=re.escape(message)):
        resolve_config(layer)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_train_with_a_non_finite_lr_exits_2_before_making_a_run_folder(tmp_path, capsys, value):
    from cnnlab.cli import main

    assert main(["train", f"--lr={value}", "--epochs", "1", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert f"--lr must be a finite number, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_every_train_option_has_a_flag_shown_in_help_and_in_the_readme_table(capsys):
    """A TrainConfig field without its flag, --help line or README row is an option users cannot find."""
    import dataclasses
    from pathlib import Path

    from cnnlab.cli import main
    from cnnlab.cli.train import TRAIN_FLAGS
    from cnnlab.config import AugmentConfig, OptimConfig, TrainConfig

    sections = {"": TrainConfig, "optim.": OptimConfig, "augment.": AugmentConfig}
    fields = {
        prefix + f.name for prefix, cls in sections.items() for f in dataclasses.fields(cls) if f.name not in ("optim", "augment")
    }
    flags = {dest: flag for flag, dest, _ in TRAIN_FLAGS}
    # Adam's betas: a YAML option only; world_size: recorded from the launch (--nproc, torchrun), not chosen
    assert fields - set(flags) == {"optim.betas", "world_size"}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text, readme = capsys.readouterr().out, (Path(__file__).parent.parent / "README.md").read_text()
    for flag in flags.values():
        assert flag in help_text and f"`{flag}`" in readme, flag
