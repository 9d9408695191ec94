import hashlib
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
from cnnlab.train.checkpoint import (
    Checkpoint,
    copy_checkpoint,
    digest_path,
    load_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)


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
    with pytest.raises(CnnlabError, match="not a readable cnnlab checkpoint: .* unsafe to load") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    # torch's own message advises weights_only=False, the very thing that would run the payload.
    assert "weights_only" not in str(refused.value) and "False" not in str(refused.value)


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]  # no temp file left behind


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


def test_a_checkpoint_has_a_sha256_sidecar_that_sha256sum_reads(tmp_path):
    save_checkpoint(tmp_path / "c.pt", make_checkpoint())
    digest = hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()
    assert digest_path(tmp_path / "c.pt").read_text() == f"{digest}  c.pt\n"
    assert subprocess.run(["sha256sum", "--check", "--quiet", "c.pt.sha256"], cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("where", [0, 1, 100, 0.25, 0.5, 0.75, -200, -1])
def test_one_flipped_byte_anywhere_is_refused_by_its_digest(tmp_path, where):
    path = tmp_path / "c.pt"
    save_checkpoint(path, make_checkpoint())
    data = bytearray(path.read_bytes())
    position = int(where * len(data)) if isinstance(where, float) else where
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CnnlabError, match=r"c.pt is corrupt: its bytes do not match the SHA-256 in c.pt.sha256"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_sidecar_still_loads(tmp_path):
    """Checkpoints written before digests existed keep working."""
    save_checkpoint(tmp_path / "c.pt", make_checkpoint())
    digest_path(tmp_path / "c.pt").unlink()
    assert load_checkpoint(tmp_path / "c.pt").epoch == 1


def test_a_malformed_sidecar_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c.pt", make_checkpoint())
    digest_path(tmp_path / "c.pt").write_text("not a digest\n")
    with pytest.raises(CnnlabError, match="is not a SHA-256 line"):
        load_checkpoint(tmp_path / "c.pt")


@pytest.mark.parametrize("fail_at", [1, 2, 3], ids=["first-sidecar", "checkpoint", "last-sidecar"])
def test_a_save_stopped_between_any_two_of_its_writes_leaves_a_file_matching_its_digest(tmp_path, monkeypatch, fail_at):
    from cnnlab import atomicfile

    path = tmp_path / "c.pt"
    save_checkpoint(path, make_checkpoint(epoch=1))
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # killed before this rename
        real_replace(src, dst)

    monkeypatch.setattr(atomicfile.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_checkpoint(epoch=2))
    monkeypatch.setattr(atomicfile.os, "replace", real_replace)
    assert load_checkpoint(path).epoch == (2 if fail_at == 3 else 1)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_copied_checkpoint_verifies_and_outlives_its_source(tmp_path):
    save_checkpoint(tmp_path / "last.pt", make_checkpoint(epoch=1))
    copy_checkpoint(tmp_path / "last.pt", tmp_path / "last.prev.pt")
    save_checkpoint(tmp_path / "last.pt", make_checkpoint(epoch=2))
    assert load_checkpoint(tmp_path / "last.prev.pt").epoch == 1 and load_checkpoint(tmp_path / "last.pt").epoch == 2


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    import errno

    from cnnlab import atomicfile

    path = tmp_path / "c.pt"
    save_checkpoint(path, make_checkpoint(epoch=1))
    real_fdopen = atomicfile.os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.f.close()

    monkeypatch.setattr(atomicfile.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(CnnlabError, match=r"^cannot write .*c.pt.*: No space left on device; the previous"):
        save_checkpoint(path, make_checkpoint(epoch=2))
    monkeypatch.setattr(atomicfile.os, "fdopen", real_fdopen)
    assert load_checkpoint(path).epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]


def test_a_file_size_limit_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE below a checkpoint's size, in a real process: EFBIG, one clear error, the old file loads."""
    path = tmp_path / "c.pt"
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(os.path.dirname(os.path.abspath(__file__)))!r} + "/../..")
        from tests.train.test_checkpoint import make_checkpoint
        from cnnlab.errors import CnnlabError
        from cnnlab.train.checkpoint import save_checkpoint
        save_checkpoint({str(path)!r}, make_checkpoint(1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            save_checkpoint({str(path)!r}, make_checkpoint(2))
        except CnnlabError as exc:
            print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "File too large; the previous c.pt (if any) is kept" in result.stdout
    assert load_checkpoint(path).epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]
