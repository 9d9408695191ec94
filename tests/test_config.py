"""How a run's options are resolved: defaults, then the tuned recipe, then a config file, then flags."""

import pytest

from cnnlab.config import RECIPES, TrainConfig, recipe_for, resolve_config
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
        resolve_config({"model": model, "dataset": dataset}).validate()


def test_a_mistake_in_a_layer_is_named():
    with pytest.raises(CnnlabError, match="unknown option"):
        resolve_config({"batch": 3})


def test_the_recipe_can_be_left_out():
    plain = resolve_config({"dataset": "fashion-mnist"}, {"epochs": 3}, recipe=False)
    assert (plain.batch_size, plain.epochs, plain.optim.lr) == (128, 3, 0.1)


def test_an_empty_section_in_a_file_keeps_the_recipe():
    config = resolve_config({"dataset": "fashion-mnist", "optim": None})
    assert config.optim.lr == RECIPES[("lenet5", "fashion-mnist")]["optim"]["lr"]
