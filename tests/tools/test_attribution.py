"""Feature maps, saliency and Grad-CAM: a known answer (the class lies in one corner), the model's own
activations, and `cnnlab inspect RUN --image` reading images as `cnnlab predict` does."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.tools.attribution import explain, tile


def corner_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 16, 16) noise in [0, 0.5] and labels: class 1 has a bright 4x4 square in the top-left corner,
    class 0 has not. Nothing else in an image says anything of its class."""
    x = torch.rand(n, 1, 16, 16, generator=generator) * 0.5
    y = torch.randint(0, 2, (n,), generator=generator)
    x[y == 1, 0, 2:6, 2:6] = 1.0
    return x, y


@pytest.fixture(scope="module")
def corner_model() -> nn.Module:
    """A small CNN with global average pooling (Grad-CAM's home ground), trained until it finds the square."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        x, y = corner_images(32, generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def quarters(heat: torch.Tensor) -> list[float]:
    """The shares of a (16, 16) map's mass in its four 8x8 quarters, the top-left one first."""
    total = heat.sum()
    return [(heat[r : r + 8, c : c + 8].sum() / total).item() for r in (0, 8) for c in (0, 8)]


def test_grad_cam_and_saliency_put_their_mass_where_the_class_is(corner_model):
    x, y = corner_images(100, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (corner_model(x).argmax(dim=1) == y).float().mean() > 0.95
    shown = torch.nonzero(y == 1).flatten()[:10].tolist()  # images whose class is drawn in the corner
    for i in shown:
        explanation = explain(corner_model, x[i : i + 1])
        assert explanation.target == 1
        assert explanation.gradcam.shape == (16, 16) and explanation.gradcam.max() == 1.0
        assert quarters(explanation.gradcam)[0] > 0.8, i  # a quarter of the image, four fifths of the heat
        saliency = quarters(explanation.saliency)
        assert saliency[0] == max(saliency), i


def test_feature_maps_are_the_convolutions_outputs_and_nothing_is_left_behind():
    torch.manual_seed(0)
    model = create_model("lenet5", (1, 28, 28), 10).train()
    x = torch.randn(1, 1, 28, 28)
    explanation = explain(model, x, target=3)
    assert list(explanation.feature_maps) == ["0", "3"] and explanation.gradcam_layer == "3"
    assert model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(explanation.feature_maps["0"], model[0](x)[0])
        torch.testing.assert_close(explanation.probabilities, model(x).softmax(dim=1)[0])
    assert explanation.target == 3
    # Grad-CAM on the first convolution instead: a map at the full input size all the same.
    assert explain(model, x, layer="0").gradcam.shape == (28, 28)
    with pytest.raises(CnnlabError, match="unknown layer '7': --layer takes one of the model's convolutions, 0, 3"):
        explain(model, x, layer="7")


def test_tiles_lay_maps_out_in_a_grid_each_on_its_own_scale():
    maps = torch.stack([torch.zeros(2, 3), torch.arange(6.0).view(2, 3), 10 + torch.arange(6.0).view(2, 3)])
    grid = tile(maps, columns=2)  # (2 rows x 2 + 1 gap, 2 columns x 3 + 1 gap)
    assert grid.shape == (5, 7)
    assert (grid[:, 3] == 255).all() and (grid[2, :] == 255).all()  # the white lines between maps
    np.testing.assert_array_equal(grid[0:2, 4:7], grid[3:5, 0:3])  # same pattern, other offset: same picture
    assert grid[3, 0] == 0 and grid[4, 2] == 255


def write_png(path, size: tuple[int, int], mode: str = "L") -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
    Image.fromarray(pixels.squeeze()).save(path)


def test_inspect_image_writes_the_pictures_and_ranks_as_predict_does(trained_run, tmp_path, capsys):
    image = tmp_path / "photo.png"
    write_png(image, (40, 30), "RGB")  # another size and colour: resized and made grey, as predict does
    out = tmp_path / "seen"
    assert main(["inspect", str(trained_run), "--image", str(image), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["predict", str(trained_run), str(image), "--top-k", "3", "--json"]) == 0
    (predicted,) = json.loads(capsys.readouterr().out)["predictions"]
    assert result["classes"] == predicted["classes"]
    np.testing.assert_allclose(result["probabilities"], predicted["probabilities"], atol=1e-5)
    assert result["gradcam_layer"] == "3" and result["explained_class"] == predicted["classes"][0]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["features-0.png", "features-3.png", "gradcam.png", "input.png", "saliency.png"]
    with Image.open(out / "input.png") as seen:
        assert seen.size == (112, 112) and seen.mode == "L"  # 28x28, drawn 4x
    with Image.open(out / "features-3.png") as maps:
        assert maps.size == (4 * 9 * 7 - 7, 4 * 9 * 7 - 7)  # 16 maps of 8x8, 4 a row, 1-pixel gaps, drawn 7x


@pytest.mark.parametrize(
    "content, message",
    [(b"not an image", "not a PNG, JPEG, BMP, WebP, GIF, TIFF or PPM image"), (None, "does not exist")],
)
def test_an_unreadable_image_is_refused_as_predict_refuses_it(trained_run, tmp_path, capsys, content, message):
    image = tmp_path / "bad.png"
    if content is not None:
        image.write_bytes(content)
    assert main(["predict", str(trained_run), str(image)]) == 2
    predict_error = capsys.readouterr().err
    assert main(["inspect", str(trained_run), "--image", str(image)]) == 2
    assert capsys.readouterr().err == predict_error
    assert message in predict_error and predict_error.count("\n") == 1


def test_an_unknown_layer_is_one_line_and_exit_2(trained_run, tmp_path, capsys):
    image = tmp_path / "digit.png"
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="PNG")
    image.write_bytes(buffer.getvalue())
    assert main(["inspect", str(trained_run), "--image", str(image), "--layer", "fc"]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'fc'" in err and err.count("\n") == 1
