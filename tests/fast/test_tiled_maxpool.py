"""The compiled tiling max-pool (+ ReLU) against torch's max_pool2d and relu, bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.fast.tiled_maxpool import NO_SWITCH, tiled_max_pool, tiled_max_pool_backward


def reference(x: torch.Tensor, kernel: tuple[int, int], relu: bool, dout: torch.Tensor):
    x = x.clone().requires_grad_()
    y = F.max_pool2d(x, kernel)
    if relu:
        y = F.relu(y)
    y.backward(dout)
    return y.detach(), x.grad


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    relu=st.booleans(),
    double=st.booleans(),
    nans=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_values_and_gradients_equal_torchs(n, c, h, w, kh, kw, relu, double, nans, seed):
    if h < kh or w < kw:
        return
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    # Values rounded to one decimal: many windows hold ties, and some hold only negatives.
    x = torch.randn(n, c, h, w, generator=generator, dtype=dtype).round(decimals=1)
    if nans:  # a fifth of the values NaN: some windows hold one, some several
        x[torch.rand(x.shape, generator=generator) < 0.2] = float("nan")
    dout = torch.randn(n, c, h // kh, w // kw, generator=generator, dtype=dtype)
    expected_y, expected_dx = reference(x, (kh, kw), relu, dout)

    y, switch = tiled_max_pool(x, (kh, kw), relu)
    dx = tiled_max_pool_backward(dout, switch, (kh, kw), x.shape)

    assert y.dtype == dtype and torch.equal(y.isnan(), expected_y.isnan())
    assert torch.equal(y.nan_to_num(), expected_y.nan_to_num())
    assert torch.equal(dx, expected_dx)


def test_a_window_cut_by_the_relu_has_no_switch_and_sends_nothing_back():
    x = torch.tensor([[[[-1.0, -2.0, 3.0, 0.0], [-3.0, -4.0, 1.0, 2.0]]]])  # (1, 1, 2, 4): two 2x2 windows
    y, switch = tiled_max_pool(x, (2, 2), relu=True)
    assert y.flatten().tolist() == [0.0, 3.0]
    assert switch.flatten().tolist() == [NO_SWITCH, 0]
    dx = tiled_max_pool_backward(torch.ones(1, 1, 1, 2), switch, (2, 2), x.shape)
    assert dx.flatten().tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_nan_wins_its_window_and_passes_the_relu_as_in_torch():
    x = torch.tensor([[[[1.0, float("nan")], [5.0, 2.0]]]])
    dout = torch.full((1, 1, 1, 1), 7.0)
    expected_y, expected_dx = reference(x, (2, 2), True, dout)
    y, switch = tiled_max_pool(x, (2, 2), relu=True)
    assert y.isnan().all() and expected_y.isnan().all()
    assert torch.equal(tiled_max_pool_backward(dout, switch, (2, 2), x.shape), expected_dx)


@pytest.mark.parametrize("relu", [False, True])
def test_every_mix_of_ties_and_nans_in_a_window_sends_the_gradient_where_torch_does(relu):
    """All 4**4 fillings of a 2x2 window from {0, 1, 2, NaN}: of equal maxima torch takes the
    first in row-major order, of several NaNs the last; both passes here must agree with that."""
    values = torch.tensor([0.0, 1.0, 2.0, float("nan")])
    fillings = torch.cartesian_prod(values, values, values, values)  # (256, 4)
    x = fillings.view(1, 256, 2, 2)  # one window per channel
    dout = torch.arange(1.0, 257.0).view(1, 256, 1, 1)
    expected_y, expected_dx = reference(x, (2, 2), relu, dout)
    y, switch = tiled_max_pool(x, (2, 2), relu)
    assert torch.equal(y.isnan(), expected_y.isnan()) and torch.equal(y.nan_to_num(), expected_y.nan_to_num())
    assert torch.equal(tiled_max_pool_backward(dout, switch, (2, 2), x.shape), expected_dx)


def test_non_contiguous_inputs_are_read_as_their_values():
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    y, _ = tiled_max_pool(x, (2, 2), relu=False)
    assert torch.equal(y, F.max_pool2d(x, 2))
