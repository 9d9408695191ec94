import json

import pytest
import torch

from cnnlab.backprop.activations import ReLU
from cnnlab.backprop.gradcheck import KINK_PROBE, check_model, check_sequential, finite_difference_errors
from cnnlab.backprop.pool import MaxPool2d
from cnnlab.cli import main
from cnnlab.models import all_models, create_model

SMALL_INPUT = {"cifar_cnn": (3, 12, 12), "lenet5": (1, 20, 20), "lenet5_bn": (1, 20, 20)}


@pytest.mark.parametrize("name", sorted(spec.name for spec in all_models()))
def test_every_registered_model_passes_its_gradient_check(name):
    report = check_model(name, SMALL_INPUT.get(name, (1, 12, 12)), batch_size=2, points=4)
    assert report.passed, report.table()
    assert all(row.fd_points > 0 for row in report.rows)
    assert report.rows[-1].layer == "loss SoftmaxCrossEntropy"


def test_gradcheck_command_prints_a_table_and_exits_0_on_lenet5(capsys):
    assert main(["gradcheck", "--model", "lenet5", "--input", "1,28,28"]) == 0
    out = capsys.readouterr().out
    assert "gradcheck of lenet5 on input (2, 1, 28, 28)" in out
    assert "0 Conv2d" in out and "11 Linear" in out and "all 13 layers within tolerance" in out


def test_gradcheck_command_exits_1_and_names_a_layer_whose_backward_is_off(capsys, monkeypatch):
    original = ReLU.backward

    def slightly_off(self, dout):
        return original(self, dout) * 1.001

    monkeypatch.setattr(ReLU, "backward", slightly_off)
    assert main(["gradcheck", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failed = [row["layer"] for row in report["layers"] if not row["passed"]]
    assert failed == ["1 ReLU", "4 ReLU", "8 ReLU", "10 ReLU"] and report["passed"] is False
    assert 5e-4 < report["layers"][1]["autograd_rel"] < 2e-3


def test_a_gradient_sent_to_the_wrong_place_fails_against_both_references(monkeypatch):
    """A max-pool that routes each gradient to the window's first pixel instead of its maximum."""

    def first_pixel(self, dout):
        self._take(dout)
        n, c, oh, ow = dout.shape
        dx = torch.zeros(n, c, 2 * oh, 2 * ow, dtype=dout.dtype)  # LeNet-5's pools: 2x2, stride 2
        dx[:, :, ::2, ::2] = dout
        return dx

    monkeypatch.setattr(MaxPool2d, "backward", first_pixel)
    rows = {row.layer: row for row in check_model("lenet5").rows}
    assert not rows["2 MaxPool2d"].passed and not rows["5 MaxPool2d"].passed
    assert rows["2 MaxPool2d"].fd_rel > 1e-3 and rows["2 MaxPool2d"].autograd_rel > 1e-3
    assert rows["0 Conv2d"].passed


def test_a_bad_input_shape_is_a_usage_error(capsys):
    assert main(["gradcheck", "--input", "1x28"]) == 2
    assert "--input must look like 1x28x28" in capsys.readouterr().err


def test_residual_blocks_pass_the_gradient_check(resnet):
    torch.manual_seed(0)
    report = check_sequential(resnet.resnet((3, 12, 12), 10, blocks_per_stage=1), "resnet8", (2, 3, 12, 12), points=4)
    assert report.passed, report.table()
    residual_rows = [row for row in report.rows if row.layer.endswith("Residual")]
    assert len(residual_rows) == 3 and all(row.fd_points > 0 for row in residual_rows)


def test_kinks_are_skipped_but_sharp_curvature_is_compared():
    generator = torch.Generator().manual_seed(0)
    # |t| with t a third of the kink probe from its kink: the central difference is exact, the
    # wide probe straddles the kink, so the point is skipped, never judged.
    t = torch.tensor([KINK_PROBE / 3], dtype=torch.float64)
    errors = finite_difference_errors(lambda: float(t.abs().sum()), {"t": t}, {"t": torch.ones(1)}, 1, generator)
    assert errors[2:] == (0, 1)
    # 500 t^2 at t = 1e-3: a small slope (1) under a large curvature (1000), as batch norm over
    # a few values has: smooth, so compared (it used to be skipped as a kink).
    t = torch.tensor([1e-3], dtype=torch.float64)
    grad = {"t": torch.tensor([1.0], dtype=torch.float64)}
    _, worst_rel, compared, skipped = finite_difference_errors(
        lambda: float(500 * t.pow(2).sum()), {"t": t}, grad, 1, generator
    )
    assert (compared, skipped) == (1, 0) and worst_rel < 1e-6


def test_rounding_of_a_large_loss_is_not_a_gradient_error():
    # Batch norm's input gradients can be ~1e-4 while the checked sum is ~100: a central
    # difference of such an f carries ~3e-8 of rounding, 3e-6 of SCALE_FLOOR (hypothesis found
    # a sum of 30 failing at 1.4e-6).
    x = torch.tensor([-2.3104, -0.3733, -1.0608, 0.9995, -0.8840, -1.2755, -0.6232, -0.8664, -1.2956, 1.5236, 0.3237,
                      2.0177, 1.1357, -1.2269, 0.0714, 0.3380, 0.1535, -0.6333, -1.2609, -0.7270, -0.0200, 0.2103,
                      0.1772, -0.8305, 1.0112, -0.2427, -0.7730, -1.5952, -0.6870, 1.4881, -0.4484, -0.8910],
                     dtype=torch.float64).view(2, 1, 4, 4)  # fmt: skip
    norm = torch.nn.BatchNorm2d(1, track_running_stats=False).double()
    dout = 4 * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaf = x.clone().requires_grad_()
    (norm(leaf) * dout).sum().backward()

    def f() -> float:
        with torch.no_grad():
            return float((norm(x) * dout).sum())

    assert abs(f()) > 100 and float(leaf.grad.abs().max()) < 1e-3
    generator = torch.Generator().manual_seed(0)
    _, worst_rel, compared, _ = finite_difference_errors(f, {"x": x}, {"x": leaf.grad}, 32, generator)
    assert compared == 32 and worst_rel < 1e-6
    # The allowance is rounding's, no more: a gradient off by 1e-6 of the loss's scale still fails.
    off = {"x": leaf.grad + 3e-7 * torch.sign(leaf.grad)}
    assert finite_difference_errors(f, {"x": x}, off, 32, generator)[1] > 1e-6


def test_a_model_built_with_dropout_passes_gradcheck_dropout_layers_included():
    torch.manual_seed(0)
    report = check_sequential(create_model("lenet5", (1, 16, 16), 4, dropout=0.5), "lenet5", (3, 1, 16, 16), points=6)
    dropout_rows = [row for row in report.rows if "Dropout" in row.layer]
    assert len(dropout_rows) == 3 and report.passed, report.table()
