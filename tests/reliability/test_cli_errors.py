"""What the command line says when its output pipe closes or a model meets the wrong dataset."""

import subprocess
import sys

from cnnlab.cli import main
from cnnlab.train.checkpoint import save_checkpoint
from tests.train.test_checkpoint import make_checkpoint


def test_a_closed_output_pipe_ends_quietly(tmp_path):
    """`cnnlab models | head`: the reader is gone before cnnlab writes; no BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader goes away before cnnlab writes a line
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert err == ""


def test_evaluating_on_a_dataset_with_other_class_names_names_them(tmp_path, capsys):
    """Same image shape, same number of classes: what differs is the names, and the message says which."""
    save_checkpoint(tmp_path / "letters.pt", make_checkpoint())  # classes a..j, (1, 28, 28)
    assert main(["evaluate", str(tmp_path / "letters.pt"), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "expects classes 'a', 'b', 'c', where 'digits' has '0', '1', '2'" in err
    assert "(1, 28, 28) images of 10 classes" not in err


def test_evaluating_on_images_of_another_size_names_the_sizes(tmp_path, capsys):
    checkpoint = make_checkpoint()
    checkpoint.classes = tuple(str(d) for d in range(10))
    checkpoint.model = {**checkpoint.model, "in_shape": [3, 28, 28]}
    save_checkpoint(tmp_path / "rgb.pt", checkpoint)
    assert main(["evaluate", str(tmp_path / "rgb.pt"), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "expects images (3, 28, 28), 'digits' has (1, 28, 28)" in err and "classes" not in err.split("expects")[1].split(":")[0]
