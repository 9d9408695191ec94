import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.backprop.gradcheck import finite_difference_errors
from cnnlab.backprop.losses import MSELoss, OneHotMSE, SoftmaxCrossEntropy, make_loss
from cnnlab.errors import CnnlabError
from tests.backprop.conftest import random_input


def relative_error(a, b):
    return float((a - b).abs().max() / max(a.abs().max(), b.abs().max()))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 7), st.sampled_from([0.0, 0.1, 0.5]), st.integers(0, 2**16))
def test_cross_entropy_matches_torch_in_value_and_gradient(n, k, smoothing, seed):
    z = random_input((n, k), seed) * 3
    y = torch.randint(k, (n,), generator=torch.Generator().manual_seed(seed))
    loss = SoftmaxCrossEntropy(smoothing)
    z_leaf = z.clone().requires_grad_()
    expected = F.cross_entropy(z_leaf, y, label_smoothing=smoothing)
    (expected_dz,) = torch.autograd.grad(expected, z_leaf)
    assert loss.forward(z, y).item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
    dz = loss.backward()
    assert relative_error(dz, expected_dz) <= 1e-10

    def f():
        return float(F.cross_entropy(z, y, label_smoothing=smoothing))

    fd_abs, fd_rel, points, _ = finite_difference_errors(f, {"z": z}, {"z": dz}, 8, torch.Generator())
    assert fd_rel <= 1e-6 and points > 0


def test_cross_entropy_is_stable_for_huge_logits():
    z = torch.tensor([[1000.0, -1000.0, 0.0]])
    loss = SoftmaxCrossEntropy()
    assert loss.forward(z, torch.tensor([0])).item() == 0.0
    assert torch.isfinite(loss.backward()).all()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), st.integers(0, 2**16))
def test_mse_matches_torch_in_value_and_gradient(shape, seed):
    p, t = random_input(shape, seed), random_input(shape, seed + 1)
    p_leaf = p.clone().requires_grad_()
    expected = F.mse_loss(p_leaf, t)
    (expected_dp,) = torch.autograd.grad(expected, p_leaf)
    loss = MSELoss()
    assert loss.forward(p, t).item() == pytest.approx(expected.item(), rel=1e-12)
    assert relative_error(loss.backward(), expected_dp) <= 1e-10


def test_losses_say_what_shapes_they_got():
    with pytest.raises(CnnlabError, match=r"logits \(N, K\) and labels \(N,\), got \(4, 10\) and \(3,\)"):
        SoftmaxCrossEntropy().forward(torch.zeros(4, 10), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(CnnlabError, match=r"got \(2, 3\) and \(3, 2\)"):
        MSELoss().forward(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(CnnlabError, match="backward\\(\\) needs a forward\\(\\) first"):
        MSELoss().backward()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(2, 7), st.sampled_from([0.0, 0.1]), st.integers(0, 2**16))
def test_one_hot_mse_is_torch_mse_loss_on_one_hot_targets_in_value_and_gradient(n, k, smoothing, seed):
    z = random_input((n, k), seed) * 3
    y = torch.randint(k, (n,), generator=torch.Generator().manual_seed(seed))
    target = F.one_hot(y, k).double() * (1 - smoothing) + smoothing / k
    z_leaf = z.clone().requires_grad_()
    expected = torch.nn.MSELoss()(z_leaf, target)
    (expected_dz,) = torch.autograd.grad(expected, z_leaf)
    loss = OneHotMSE(smoothing)
    assert loss.forward(z, y).item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-14)
    dz = loss.backward()
    assert relative_error(dz, expected_dz) <= 1e-10

    fd_abs, fd_rel, points, _ = finite_difference_errors(
        lambda: float(F.mse_loss(z, target)), {"z": z}, {"z": dz}, 8, torch.Generator()
    )
    assert fd_rel <= 1e-6 and points > 0


def test_make_loss_builds_the_loss_train_names():
    assert isinstance(make_loss("mse", 0.1), OneHotMSE) and make_loss("mse", 0.1).label_smoothing == 0.1
    assert isinstance(make_loss("cross-entropy"), SoftmaxCrossEntropy)
    with pytest.raises(CnnlabError, match="expects logits"):
        OneHotMSE().forward(torch.zeros(3), torch.zeros(3, dtype=torch.int64))
