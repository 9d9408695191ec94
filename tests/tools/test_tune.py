"""cnnlab tune: studies that continue and are shared, a search that never reads the test split, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from cnnlab.cli import main
from cnnlab.config import load_yaml_config, resolve_config
from cnnlab.data.dataset import DatasetSplits, ImageDataset

# One epoch of LeNet-5 on digits per trial, over a space of two options: seconds a trial.
SPACE = {"optim.lr": {"low": 0.02, "high": 0.2, "log": True}, "batch_size": {"choices": [32, 64]}}


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def _tune(tmp_path: Path, *extra: str) -> int:
    return main(["tune", "--epochs", "1", "--space", str(_space(tmp_path)), "--runs-dir", str(tmp_path / "runs"),
                 "--sampler", "random", "--study", "s", *extra])  # fmt: skip


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'runs' / 's' / 'study.db'}")


def test_the_same_command_again_continues_the_study_with_its_earlier_trials(tmp_path: Path) -> None:
    assert _tune(tmp_path, "--trials", "2") == 0
    first = [(t.number, t.params, t.value) for t in _study(tmp_path).trials]
    assert _tune(tmp_path, "--trials", "3") == 0
    trials = _study(tmp_path).trials
    assert len(trials) == 3
    assert [(t.number, t.params, t.value) for t in trials[:2]] == first
    # best.yaml is the best trial's config, read as `cnnlab train --config` reads it.
    best = max(trials, key=lambda t: t.value)
    config = resolve_config(load_yaml_config(tmp_path / "runs" / "s" / "best.yaml"), recipe=False)
    assert (config.optim.lr, config.batch_size, config.epochs) == (best.params["optim.lr"], best.params["batch_size"], 1)
    # Only the best trial was tested.
    tested = sorted(p.parent.name for p in (tmp_path / "runs" / "s").glob("trial-*/summary.json"))
    assert tested == [f"trial-{best.number:04d}"]
    assert (tmp_path / "runs" / "s" / "history.png").is_file()


def test_two_tune_processes_share_one_sqlite_study(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "cnnlab", "tune", "--trials", "4", "--epochs", "1", "--space", str(_space(tmp_path)),
               "--runs-dir", str(tmp_path / "runs"), "--study", "s", "--sampler", "random"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]  # fmt: skip
    for process in processes:
        _, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr
    trials = _study(tmp_path).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) >= 4  # each process stops once the study holds 4; one may be running past it
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == len(trials)
    assert len({t.number for t in trials}) == len(trials)


class _Unreadable(ImageDataset):
    """A test split whose images and labels raise when anything reads them."""

    def __getattribute__(self, name: str):
        if name in ("images", "labels"):
            raise AssertionError("the test split was read during the search")
        return super().__getattribute__(name)


def test_the_search_never_reads_the_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnlab.train import loop

    load = loop.load_splits

    def load_with_unreadable_test(*args, **kwargs) -> DatasetSplits:
        splits = load(*args, **kwargs)
        test = _Unreadable.__new__(_Unreadable)
        object.__setattr__(test, "classes", splits.test.classes)
        return DatasetSplits(splits.name, splits.train, splits.val, test)

    monkeypatch.setattr(loop, "load_splits", load_with_unreadable_test)
    # The trials load their data through the loop; the final test of the best trial loads its own.
    assert _tune(tmp_path, "--trials", "2", "--pruner", "none") == 0
    summary = yaml.safe_load((tmp_path / "runs" / "s" / "tune.json").read_text())
    assert 0.1 < summary["best"]["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("space", "args", "message"),
    [
        (SPACE, ["--sampler", "bayes"], "unknown sampler 'bayes'"),
        ("optim.lr: {low: 0.1}\n", [], "needs low and high"),
        ("optim.lr: [low, 0.1\n", [], "is not valid YAML"),
        ({"optim.lrate": {"low": 0.01, "high": 0.1}}, [], "unknown option(s) lrate"),
        (SPACE, ["--storage", "sqlite:///{file}/study.db"], "cannot create"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, space, args, message) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(space if isinstance(space, str) else yaml.safe_dump(space))
    (tmp_path / "a-file").write_text("")
    args = [a.replace("{file}", str(tmp_path / "a-file")) for a in args]
    status = main(["tune", "--trials", "1", "--space", str(path), "--runs-dir", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and message in err, err
