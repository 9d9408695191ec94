import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cnnlab.data.dataset import Normalization
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.train import checkpoint as checkpoint_module
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path, save_checkpoint


def make_checkpoint(epoch: int = 1) -> Checkpoint:
    torch.manual_seed(epoch)
    model = create_model("lenet5", (1, 28, 28), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    return Checkpoint(
        model={"name": "lenet5", "in_shape": [1, 28, 28], "num_classes": 10},
        model_state=model.state_dict(),
        normalization=Normalization((0.5,), (0.25,)),
        classes=tuple("abcdefghij"),
        dataset="digits",
        epoch=epoch,
        step=7 * epoch,
        optimizer_state=optimizer.state_dict(),
        rng={"torch": torch.get_rng_state()},
        config={"model": "lenet5"},
        metrics={"val_accuracy": 0.5},
    )


def test_round_trip_keeps_every_field(tmp_path):
    original = make_checkpoint()
    save_checkpoint(tmp_path / "c.pt", original)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded.model == original.model and loaded.classes == original.classes
    assert loaded.normalization == original.normalization and (loaded.epoch, loaded.step) == (1, 7)
    assert torch.equal(loaded.rng["torch"], original.rng["torch"])
    for key, value in original.model_state.items():
        assert torch.equal(loaded.model_state[key], value)
    momentum = loaded.optimizer_state["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, original.optimizer_state["state"][0]["momentum_buffer"])
    rebuilt = loaded.build_model()
    assert not rebuilt.training and torch.equal(rebuilt[0].weight, original.model_state["0.weight"])


def test_the_file_holds_only_plain_data(tmp_path):
    save_checkpoint(tmp_path / "c.pt", make_checkpoint())
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert payload["cnnlab_checkpoint"] == checkpoint_module.FORMAT_VERSION


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not a readable cnnlab checkpoint"), (b"PK\x03\x04garbage", "not a readable cnnlab checkpoint")],
    ids=["empty", "broken-zip"],
)
def test_corrupt_files_are_one_clear_error(tmp_path, content, message):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CnnlabError, match=message):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c.pt", make_checkpoint())
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CnnlabError, match="corrupt"):
        load_checkpoint(tmp_path / "c.pt")


def test_a_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"cnnlab_checkpoint": 1, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CnnlabError, match="not a readable cnnlab checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_other_torch_files_are_not_taken_for_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CnnlabError, match="no format marker"):
        load_checkpoint(tmp_path / "other.pt")


def test_weights_of_another_model_are_refused(tmp_path):
    checkpoint = make_checkpoint()
    checkpoint.model = {**checkpoint.model, "name": "simple_cnn"}
    save_checkpoint(tmp_path / "c.pt", checkpoint)
    with pytest.raises(CnnlabError, match="do not fit model 'simple_cnn'"):
        load_checkpoint(tmp_path / "c.pt").build_model()


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, make_checkpoint(epoch=1))

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, make_checkpoint(epoch=2))
    assert load_checkpoint(path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_a_process_killed_while_writing_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that rewrites the checkpoint in a loop: whatever moment it dies, the file loads."""
    path = tmp_path / "c.pt"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(os.path.dirname(os.path.abspath(__file__)))!r} + "/../..")
        from tests.train.test_checkpoint import make_checkpoint
        from cnnlab.train.checkpoint import save_checkpoint
        epoch = 1
        while True:
            save_checkpoint({str(path)!r}, make_checkpoint(epoch))
            print(epoch, flush=True)
            epoch += 1
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            process.stdout.readline()  # a few checkpoints have been written
        time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert load_checkpoint(path).epoch >= 3


def test_a_run_directory_resolves_to_its_best_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CnnlabError, match="holds no checkpoints"):
        resolve_checkpoint_path(tmp_path)
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", make_checkpoint())
    assert resolve_checkpoint_path(tmp_path).name == "last.pt"
    save_checkpoint(tmp_path / "checkpoints" / "best.pt", make_checkpoint())
    assert resolve_checkpoint_path(tmp_path).name == "best.pt"
    with pytest.raises(CnnlabError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
