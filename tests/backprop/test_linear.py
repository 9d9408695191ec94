import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.backprop.network import layer_from_torch
from cnnlab.errors import CnnlabError
from tests.backprop.conftest import assert_matches_torch, random_input


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 6), st.booleans(), st.integers(0, 2**16))
def test_linear_gradients_match_autograd_and_finite_differences(n, d, k, bias, seed):
    torch.manual_seed(seed)
    assert_matches_torch(nn.Linear(d, k, bias=bias), random_input((n, d), seed))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=5).map(tuple), st.data())
def test_flatten_matches_torch_for_any_dimensions(shape, data):
    start = data.draw(st.integers(0, len(shape) - 1))
    end = data.draw(st.integers(start, len(shape) - 1))
    assert_matches_torch(nn.Flatten(start, end), random_input(shape, seed=0))


def test_linear_names_the_layer_and_the_shapes_on_a_wrong_input():
    layer = layer_from_torch(nn.Linear(256, 120), "7")
    with pytest.raises(CnnlabError, match=r"Linear '7' expects input of shape \(N, 256\), got \(2, 16, 4, 4\)"):
        layer.forward(torch.zeros(2, 16, 4, 4))
