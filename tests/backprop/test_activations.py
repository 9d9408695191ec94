import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.backprop.activations import Dropout, ReLU
from cnnlab.errors import CnnlabError
from tests.backprop.conftest import assert_matches_torch, random_input

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@settings(max_examples=30, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_relu_gradients_match_away_from_the_kink(shape, seed):
    assert_matches_torch(nn.ReLU(), random_input(shape, seed, away_from_zero=True))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([nn.Tanh, nn.Sigmoid]), shapes, st.integers(0, 2**16))
def test_smooth_activations_match(activation, shape, seed):
    assert_matches_torch(activation(), random_input(shape, seed))


@settings(max_examples=20, deadline=None)
@given(shapes, st.sampled_from([0.0, 0.2, 0.5, 0.9]), st.integers(0, 2**16))
def test_dropout_in_training_matches_torch_from_the_same_random_state(shape, p, seed):
    torch.manual_seed(seed)
    assert_matches_torch(nn.Dropout(p).train(), random_input(shape, seed))


def test_dropout_draws_the_same_mask_as_torch():
    x = torch.randn(64, 32)
    torch.manual_seed(7)
    expected = F.dropout(x, 0.3, training=True)
    torch.manual_seed(7)
    assert torch.equal(Dropout(0.3).forward(x), expected)


def test_dropout_is_the_identity_in_evaluation_and_everything_goes_at_p_1():
    x = random_input((4, 5), seed=0)
    layer = Dropout(0.5).eval()
    assert torch.equal(layer.forward(x), x) and torch.equal(layer.backward(x), x)
    layer = Dropout(1.0)
    assert torch.equal(layer.forward(x), torch.zeros_like(x))
    assert torch.equal(layer.backward(x), torch.zeros_like(x))


def test_relu_gives_the_kink_the_gradient_torch_gives_it():
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    (expected,) = torch.autograd.grad(torch.relu(x), x, torch.ones(3))
    layer = ReLU()
    layer.forward(x.detach())
    assert torch.equal(layer.backward(torch.ones(3)), expected)


def test_dropout_probability_outside_0_1_is_refused():
    with pytest.raises(CnnlabError, match=r"Dropout: the dropout probability must be in \[0, 1\], got 1.5"):
        Dropout(1.5)
