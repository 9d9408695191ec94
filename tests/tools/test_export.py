"""cnnlab export: every format loads on its own and computes the trained model's logits."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.data.sources import load_splits
from cnnlab.errors import CnnlabError
from cnnlab.tools.export import FORMATS, ModelInfo, export_run
from cnnlab.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return export_run(trained_run, FORMATS, out)


@pytest.fixture(scope="module")
def reference(trained_run):
    """The trained model, the digits test images normalized for it (N, 1, 28, 28), and its logits (N, 10)."""
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    model = checkpoint.build_model()
    x = checkpoint.normalization.apply(load_splits("digits", None, 0.1, 0).test.images[:50])
    with torch.inference_mode():
        return checkpoint, x, model(x)


def test_every_format_is_written_with_its_checksum_and_a_model_card(exported):
    assert [f.format for f in exported.files] == list(FORMATS)
    manifest = json.loads((exported.out / "model.json").read_text())
    for f in exported.files:
        assert f.path.is_file() and manifest["files"][f.format]["file"] == f.path.name
        assert len(manifest["files"][f.format]["sha256"]) == 64
    card = (exported.out / "MODEL_CARD.md").read_text()
    assert card.startswith("# lenet5 on digits") and "| class | precision |" in card and "Test accuracy: " in card
    assert manifest["framing"]["background"] == "dark" and manifest["ood"]["score"] == "max_softmax"
    assert "cropped to the content" in card and "validation images were" in card


def test_onnx_runs_alone_with_its_metadata_and_matches_pytorch_at_any_batch(exported, reference):
    checkpoint, x, logits = reference
    data = (exported.out / "model.onnx").read_bytes()
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    info = ModelInfo.from_dict(json.loads({p.key: p.value for p in proto.metadata_props}["cnnlab"]), "model.onnx")
    assert info.classes == checkpoint.classes and info.in_shape == (1, 28, 28)
    assert info.normalization == checkpoint.normalization
    assert info.framing is not None and info.framing.background == "dark" and info.ood.images > 0
    assert info == ModelInfo.of(checkpoint, info.test_accuracy)  # what predict and serve measure from the run
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    for n in (1, 7, 50):  # the batch axis is free
        got = session.run(["logits"], {"images": x[:n].numpy()})[0]
        np.testing.assert_allclose(got, logits[:n].numpy(), atol=1e-4, rtol=0)
    check = json.loads((exported.out / "model.onnx.check.json").read_text())
    test_images = len(load_splits("digits", None, 0.1, 0).test)
    assert check["images"] == min(1000, test_images) and check["source"] == "digits test split"
    assert check["max_abs_logit_diff"] <= 1e-4 and check["top1_agreement"] == 1.0


def test_torch_export_and_torchscript_load_and_match(exported, reference):
    _, x, logits = reference
    program = torch.export.load(exported.out / "model.pt2")
    torch.testing.assert_close(program.module()(x), logits, atol=1e-5, rtol=0)
    scripted = torch.jit.load(exported.out / "model.torchscript.pt")
    torch.testing.assert_close(scripted(x[:3]), logits[:3], atol=1e-5, rtol=0)


def test_safetensors_and_model_json_rebuild_the_model(exported, reference):
    _, x, logits = reference
    info = ModelInfo.from_dict(json.loads((exported.out / "model.json").read_text()), "model.json")
    model = info.build_model(load_file(exported.out / "model.safetensors"))
    with torch.inference_mode():
        assert torch.equal(model(x), logits)


def test_the_command_line_exports_the_formats_asked_for_into_the_run(trained_run, capsys):
    assert main(["export", str(trained_run), "--format", "onnx,safetensors", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["files"]) == ["onnx", "safetensors"]
    assert (trained_run / "export" / "model.onnx").is_file() and result["onnx_check"]["top1_agreement"] == 1.0


def test_an_unknown_format_or_a_missing_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(CnnlabError, match="unknown export format"):
        export_run(tmp_path, ["gguf"])
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_missing_optional_package_is_one_line_naming_the_extra(trained_run, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_onnx(name, *args, **kwargs):  # onnx is imported mid-export, where it is first used
        if name == "onnx":
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnx)
    assert main(["export", str(trained_run), "--format", "onnx", "--out", str(trained_run / "no-onnx")]) == 2
    assert capsys.readouterr().err == "cnnlab: error: cnnlab export needs onnx: pip install 'cnnlab[export]'\n"
