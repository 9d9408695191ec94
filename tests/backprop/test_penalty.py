import pytest
import torch

from cnnlab.backprop.penalty import L1Penalty
from cnnlab.models import create_model


def test_the_l1_term_is_lambda_times_the_sum_of_absolute_conv_and_fc_weights():
    torch.manual_seed(0)
    model = create_model("lenet5_bn", (1, 28, 28), 10)
    params = dict(model.named_parameters())
    penalty = L1Penalty(1e-3, params)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    expected = 1e-3 * sum(float(w.detach().double().abs().sum()) for w in weights)
    assert penalty.forward().item() == pytest.approx(expected, rel=1e-12)
    assert set(penalty.names) == {name for name, p in params.items() if any(p is w for w in weights)}


def test_the_l1_gradient_is_autograds_over_the_flat_parameter_vector():
    torch.manual_seed(0)
    model = create_model("cifar_cnn_bn", (3, 16, 16), 4).double()
    params = dict(model.named_parameters())
    with torch.no_grad():
        next(iter(params.values())).view(-1)[0] = 0.0  # |w| at its kink: torch's subgradient 0
    penalty = L1Penalty(0.25, params)
    term = 0.25 * sum(p.abs().sum() for p in params.values() if p.dim() > 1)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(term, list(params.values()), materialize_grads=True)])
    assert torch.equal(penalty.gradient(), expected)
