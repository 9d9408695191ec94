"""Loading a model to serve, and the `cnnlab serve` command's one-line errors."""

from __future__ import annotations

import hashlib
import shutil
import socket

import onnx
import pytest
import torch

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.tools.export import onnx_bytes as export_onnx
from cnnlab.tools.serve.backends import load_backend


@pytest.fixture(scope="module")
def onnx_bytes(torch_backend) -> bytes:
    model = torch_backend.model
    return export_onnx(model, torch.zeros(2, *torch_backend.info.in_shape), torch_backend.info)


def test_backends_agree_and_describe_the_model(torch_backend, onnx_backend):
    x = torch.randn(5, *torch_backend.info.in_shape)
    torch.testing.assert_close(onnx_backend.logits(x), torch_backend.logits(x), atol=1e-4, rtol=1e-4)
    assert onnx_backend.info == torch_backend.info
    assert onnx_backend.kind == "onnx" and torch_backend.kind == "torch"


def test_a_run_with_an_export_serves_that_file(tmp_path, trained_run, onnx_bytes):
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "export").mkdir(exist_ok=True)
    (run / "export" / "model.onnx").write_bytes(onnx_bytes)
    backend = load_backend(run, "onnx")
    assert backend.sha256 == hashlib.sha256(onnx_bytes).hexdigest()
    (tmp_path / "alone.onnx").write_bytes(onnx_bytes)
    assert load_backend(tmp_path / "alone.onnx").info.name == "lenet5"


def test_the_torch_backend_hashes_the_checkpoint(trained_run, torch_backend):
    assert torch_backend.sha256 == hashlib.sha256((trained_run / "checkpoints" / "best.pt").read_bytes()).hexdigest()


def test_files_that_cannot_be_served_are_clear_errors(tmp_path, trained_run, onnx_bytes):
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CnnlabError, match="not an ONNX model"):
        load_backend(tmp_path / "junk.onnx")
    proto = onnx.load_from_string(onnx_bytes)
    del proto.metadata_props[:]
    (tmp_path / "plain.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(CnnlabError, match="no cnnlab metadata"):
        load_backend(tmp_path / "plain.onnx")
    with pytest.raises(CnnlabError, match="does not exist"):
        load_backend(tmp_path / "absent.onnx")
    with pytest.raises(CnnlabError, match="--backend torch"):
        load_backend(tmp_path / "plain.onnx", "torch")
    with pytest.raises(CnnlabError, match="does not exist"):
        load_backend(tmp_path / "no-such-run", "torch")


def test_cli_errors_are_one_line_and_exit_2(tmp_path, trained_run, capsys):
    assert main(["serve", str(tmp_path / "no-such-run")]) == 2
    assert capsys.readouterr().err.startswith("cnnlab: error: ")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    assert main(["serve", str(tmp_path / "junk.onnx")]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--backend", "torch", "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--workers", "0"]) == 2
    assert "--workers must be between 1 and 64, got 0" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(trained_run), "--backend", "torch", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
