"""Every command, end to end through `cnnlab.cli.main`, and every bad input it must refuse cleanly."""

import json
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from cnnlab.cli import main
from cnnlab.config import RECIPES, TrainConfig
from cnnlab.data.digits import load_digits_splits
from cnnlab.train.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import write_mnist_folder


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def fails_cleanly(capsys, argv, message):
    """Exit 2 with exactly one line on stderr that names the problem."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnnlab: error: "), err
    assert message in err, err
    return err


def test_train_json_reports_test_metrics_and_the_run(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.8  # 3 epochs of LeNet-5 on digits
    assert (trained_run / "checkpoints" / "best.pt").is_file()


def test_train_json_output_is_one_object(tmp_path, capsys):
    result = run_json(capsys, "train", "--epochs", "1", "--runs-dir", str(tmp_path), "--name", "j", "--json")
    assert set(result) >= {"run_dir", "test_accuracy", "test_loss"}
    assert result["run_dir"] == str(tmp_path / "j") and 0 <= result["test_accuracy"] <= 1


def test_evaluate_prints_per_class_figures_and_confusion(trained_run, capsys):
    assert main(["evaluate", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "precision  recall" in out and "confusion matrix" in out
    result = run_json(capsys, "evaluate", str(trained_run / "checkpoints" / "last.pt"), "--json")
    assert len(result["per_class"]) == 10 and len(result["confusion_matrix"]) == 10
    assert sum(map(sum, result["confusion_matrix"])) == 359
    assert result["run_dir"] == str(trained_run)


def test_evaluate_matches_the_accuracy_recorded_at_training(trained_run, capsys):
    result = run_json(capsys, "evaluate", str(trained_run), "--json")
    summary = json.loads((trained_run / "summary.json").read_text())
    assert result["test_accuracy"] == summary["test_accuracy"]


def test_predict_classifies_real_digit_images(trained_run, tmp_path, capsys):
    _, test = load_digits_splits()
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"digit{i}_{int(test.labels[i])}.png")
        Image.fromarray(test.images[i, 0].numpy()).convert("RGB").resize((56, 56)).save(paths[-1])
    result = run_json(capsys, "predict", str(trained_run), *map(str, paths), "--top-k", "2", "--json")
    predictions = result["predictions"]
    assert len(predictions) == 20 and all(len(p["classes"]) == 2 for p in predictions)
    assert all(1 >= p["probabilities"][0] >= p["probabilities"][1] >= 0 for p in predictions)
    correct = sum(p["classes"][0] == p["image"].rsplit("_", 1)[1][0] for p in predictions)
    assert correct >= 14
    assert main(["predict", str(trained_run), str(paths[0])]) == 0
    assert capsys.readouterr().out.startswith(f"{paths[0]}: ")


def test_models_lists_every_model_with_its_parameter_count(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lenet5" in out and "44,426" in out and "simple_cnn" in out and "cifar_cnn" in out


def test_datasets_says_where_each_was_found_or_how_to_get_it(mnist_root, capsys):
    assert main(["datasets", "--data-dir", str(mnist_root)]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "built in" in out
    assert f"found in {mnist_root / 'mnist'}" in out


def test_config_file_with_flags_overriding_it(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nbatch_size: 64\noptim:\n  lr: 0.02\n  schedule: cosine\n")
    flags = ["--epochs", "1", "--warmup", "0.1", "--runs-dir", str(tmp_path), "--name", "c"]
    assert main(["train", "--config", str(config), *flags]) == 0
    saved = (tmp_path / "c" / "config.yaml").read_text()
    assert "epochs: 1" in saved and "batch_size: 64" in saved and "lr: 0.02" in saved and "schedule: cosine" in saved
    assert "warmup_fraction: 0.1" in saved


def test_a_tuned_recipe_is_announced_and_yields_to_the_config_file_and_flags(tmp_path, capsys):
    write_mnist_folder(tmp_path / "data" / "fashion-mnist", n_train=40, n_test=10)
    common = ["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path)]
    assert main([*common, "--epochs", "1", "--name", "tuned"]) == 0
    out = capsys.readouterr().out
    assert "tuned recipe for lenet5 on fashion-mnist: batch_size=384" in out
    saved = yaml.safe_load((tmp_path / "tuned" / "config.yaml").read_text())
    recipe = RECIPES[("lenet5", "fashion-mnist")]
    assert saved["batch_size"] == recipe["batch_size"] and saved["optim"]["lr"] == recipe["optim"]["lr"]
    assert saved["epochs"] == 1  # the flag
    (tmp_path / "mine.yaml").write_text("batch_size: 16\n")
    assert main([*common, "--config", str(tmp_path / "mine.yaml"), "--epochs", "1", "--lr", "0.01", "--name", "mine"]) == 0
    saved = yaml.safe_load((tmp_path / "mine" / "config.yaml").read_text())
    assert (saved["batch_size"], saved["optim"]["lr"], saved["optim"]["momentum"]) == (16, 0.01, 0.9)
    capsys.readouterr()
    assert main([*common, "--no-recipe", "--epochs", "1", "--name", "plain"]) == 0
    assert "tuned recipe" not in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())
    assert (saved["batch_size"], saved["optim"]["lr"]) == (TrainConfig().batch_size, TrainConfig().optim.lr)
    fails_cleanly(capsys, ["train", "--resume", str(tmp_path / "plain"), "--epochs", "2", "--no-recipe"], "--resume")


def test_the_recipe_line_shows_what_will_run_and_names_the_overrides(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("tuned recipe"))
    assert line == (
        "tuned recipe for lenet5 on digits: batch_size=32, optim.lr=0.05, augment.translate=0.1 "
        "(epochs=15 overridden: 1)"
    )
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["epochs"] == 1


def test_the_recipe_line_names_what_a_config_file_overrode(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: 0.02\n")
    argv = ["train", "--config", str(tmp_path / "mine.yaml"), "--epochs", "1", "--batch-size", "32"]
    assert main([*argv, "--runs-dir", str(tmp_path), "--name", "r"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("tuned recipe"))
    # --batch-size 32 is the recipe's own value, so the recipe's batch size is what runs.
    assert line == (
        "tuned recipe for lenet5 on digits: batch_size=32, augment.translate=0.1 "
        "(epochs=15 overridden: 1, optim.lr=0.05 overridden: 0.02)"
    )
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["optim"]["lr"]) == (1, 32, 0.02)


def test_training_on_a_hand_built_mnist_folder(mnist_root, tmp_path, capsys):
    result = run_json(
        capsys, "train", "--dataset", "mnist", "--data-dir", str(mnist_root), "--epochs", "2",
        "--batch-size", "8", "--runs-dir", str(tmp_path), "--name", "m", "--json",
    )  # fmt: skip
    assert result["test_accuracy"] >= 0.0
    assert load_checkpoint(tmp_path / "m" / "checkpoints" / "last.pt").dataset == "mnist"


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cnnlab", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("cnnlab ")


# --- bad input: one line, exit 2, nothing overwritten -------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "vgg99"], "unknown model 'vgg99'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["--batch-size", "many"], "invalid int value: 'many'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        (["--warmup", "1"], "--warmup must be in (0, 1), got 1.0"),
    ],
)
def test_impossible_options_are_refused(tmp_path, capsys, flags, message):
    fails_cleanly(capsys, ["train", "--runs-dir", str(tmp_path), "--name", "x", *flags], message)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(b"\x12\x34" + f.read_bytes()[2:]), "not an IDX file (bad magic number)"),
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "truncated or corrupt"),
    ],
    ids=["wrong-magic", "truncated"],
)
def test_corrupt_data_files_are_refused(tmp_path, capsys, damage, message):
    write_mnist_folder(tmp_path / "data" / "mnist", compress=False)
    damage(tmp_path / "data" / "mnist" / "train-images-idx3-ubyte")
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path), "--name", "x"]
    fails_cleanly(capsys, argv, message)


def test_image_label_count_mismatch_is_refused(tmp_path, capsys):
    write_mnist_folder(tmp_path / "data" / "mnist", compress=False)
    labels = tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte"
    data = labels.read_bytes()
    labels.write_bytes(data[:4] + (19).to_bytes(4, "big") + data[8:-1])
    argv = ["evaluate", "--data-dir", str(tmp_path / "data")]
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path), "--name", "x"]
    fails_cleanly(capsys, argv, "holds 20 images but")


def test_missing_data_files_say_how_to_get_them(tmp_path, capsys, monkeypatch):
    from cnnlab.data import sources

    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path), "--name", "x"]
    fails_cleanly(capsys, argv, "has no folder 'mnist'")
    assert not (tmp_path / "x").exists()  # refused before the run folder is made


def test_an_existing_run_is_not_overwritten(trained_run, capsys):
    before = (trained_run / "checkpoints" / "best.pt").read_bytes()
    argv = ["train", "--runs-dir", str(trained_run.parent), "--name", trained_run.name, "--epochs", "1"]
    fails_cleanly(capsys, argv, "already exists: choose another --name, pass --overwrite")
    assert (trained_run / "checkpoints" / "best.pt").read_bytes() == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    argv = ["train", "--runs-dir", str(tmp_path), "--name", "precious", "--overwrite"]
    fails_cleanly(capsys, argv, "not a cnnlab run directory")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def test_config_file_errors(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    fails_cleanly(capsys, ["train", "--config", str(tmp_path / "typo.yaml")], "unknown option(s) epochz")
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    fails_cleanly(capsys, ["train", "--config", str(tmp_path / "bad.yaml")], "is not valid YAML")
    (tmp_path / "type.yaml").write_text("epochs: many\n")
    fails_cleanly(capsys, ["train", "--config", str(tmp_path / "type.yaml")], "epochs must be a int, got 'many'")
    fails_cleanly(capsys, ["train", "--config", str(tmp_path / "absent.yaml")], "cannot read config file")


def test_unreadable_and_missing_images(trained_run, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("this is text")
    fails_cleanly(capsys, ["predict", str(trained_run), str(tmp_path / "notes.png")], "cannot read image")
    fails_cleanly(capsys, ["predict", str(trained_run), str(tmp_path / "absent.png")], "does not exist")
    image = tmp_path / "ok.png"
    Image.new("L", (28, 28)).save(image)
    fails_cleanly(capsys, ["predict", str(trained_run), str(image), "--top-k", "0"], "--top-k must be at least 1")


def test_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    fails_cleanly(capsys, ["evaluate", str(tmp_path / "broken.pt")], "not a readable cnnlab checkpoint")
    fails_cleanly(capsys, ["predict", str(tmp_path / "broken.pt"), "x.png"], "not a readable cnnlab checkpoint")


def test_checkpoint_from_another_model(trained_run, tmp_path, capsys):
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    checkpoint.model = {**checkpoint.model, "name": "cifar_cnn"}
    save_checkpoint(tmp_path / "other.pt", checkpoint)
    fails_cleanly(capsys, ["evaluate", str(tmp_path / "other.pt")], "do not fit model 'cifar_cnn'")


def test_evaluating_on_a_dataset_of_another_shape(trained_run, tmp_path, capsys):
    write_mnist_folder(tmp_path / "mnist", size=20)
    argv = ["evaluate", str(trained_run), "--dataset", "mnist", "--data-dir", str(tmp_path)]
    fails_cleanly(capsys, argv, "evaluate it on the dataset it was trained for")


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cnnlab", "train", "--batch-size", "0", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "cnnlab: error: --batch-size must be at least 1, got 0\n"


def test_no_command_is_a_usage_error(capsys):
    fails_cleanly(capsys, [], "the following arguments are required: command")


def test_a_failed_overwrite_keeps_the_old_run(trained_run, capsys):
    before = (trained_run / "checkpoints" / "best.pt").read_bytes()
    argv = ["train", "--runs-dir", str(trained_run.parent), "--name", trained_run.name, "--overwrite", "--model", "nope"]
    fails_cleanly(capsys, argv, "unknown model 'nope'")
    assert (trained_run / "checkpoints" / "best.pt").read_bytes() == before


def test_a_folder_dataset_trains_and_strict_refuses_a_broken_image(tmp_path, capsys):
    from tests.data.test_folder import make_folder

    data = make_folder(tmp_path / "shapes", per_class=12, size=(28, 28))
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    argv = ["train", "--dataset", f"folder:{data}", "--epochs", "1", "--batch-size", "8", "--runs-dir", str(tmp_path)]
    assert main([*argv, "--name", "lenient", "--json"]) == 0
    captured = capsys.readouterr()
    assert "cnnlab: warning: " in captured.err and "broken.png" in captured.err
    assert json.loads(captured.out)["run_dir"] == str(tmp_path / "lenient")
    fails_cleanly(capsys, [*argv, "--name", "strict", "--strict"], "broken.png")
    assert not (tmp_path / "strict").exists()
