import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.backprop.network import layer_from_torch
from cnnlab.backprop.pool import MaxPool2d
from cnnlab.errors import CnnlabError
from tests.backprop.conftest import assert_matches_torch, random_input


@st.composite
def pool_windows(draw):
    """kernel, stride, padding (at most half the kernel, as torch requires) and an input that fits."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), kernel[0] + draw(st.integers(0, 5)),
             kernel[1] + draw(st.integers(0, 5)))  # fmt: skip
    return kernel, stride, padding, shape, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(pool_windows(), st.integers(1, 2), st.booleans())
def test_max_pool_gradients_match_autograd_and_finite_differences(window, dilation, ceil_mode):
    kernel, stride, padding, shape, seed = window
    shape = shape[:2] + (shape[2] + (dilation - 1) * (kernel[0] - 1), shape[3] + (dilation - 1) * (kernel[1] - 1))
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    # Distinct values: no window has a tie, so finite differences see no kink.
    assert_matches_torch(pool, random_input(shape, seed, distinct=True))


@settings(max_examples=60, deadline=None)
@given(pool_windows(), st.booleans(), st.sampled_from([None, 3]))
def test_avg_pool_gradients_match_autograd_and_finite_differences(window, count_include_pad, divisor):
    kernel, stride, padding, shape, seed = window
    pool = nn.AvgPool2d(kernel, stride, padding, count_include_pad=count_include_pad, divisor_override=divisor)
    assert_matches_torch(pool, random_input(shape, seed))


def test_overlapping_max_windows_add_up_their_gradients():
    # 3x3 windows, stride 1: the centre maximum wins all four windows and collects all four gradients.
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1:3, 1:3] = torch.tensor([[1.0, 0.5], [0.25, 0.0]], dtype=torch.float64)
    layer = MaxPool2d(3, stride=1)
    layer.forward(x)
    dx = layer.backward(torch.ones(1, 1, 2, 2, dtype=torch.float64))
    assert dx[0, 0, 1, 1] == 4 and dx.sum() == 4


def test_ties_send_the_gradient_where_torch_sends_it():
    x = torch.zeros(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)  # every window a tie
    dout = random_input((2, 3, 3, 3), seed=0)
    (expected,) = torch.autograd.grad(nn.MaxPool2d(2)(x), x, dout)
    layer = MaxPool2d(2)
    layer.forward(x.detach())
    assert torch.equal(layer.backward(dout), expected)


@pytest.mark.parametrize("size,output", [((8, 6), 1), ((8, 6), (2, 3)), ((4, 4), 4)])
def test_adaptive_average_pool_matches_torch_where_the_size_divides(size, output):
    assert_matches_torch(nn.AdaptiveAvgPool2d(output), random_input((2, 3, *size), seed=0))


def test_adaptive_average_pool_refuses_sizes_that_do_not_divide():
    layer = layer_from_torch(nn.AdaptiveAvgPool2d(3), "7")
    expected = r"AdaptiveAvgPool2d '7' pools to 3x3, which does not divide the input of shape \(1, 2, 8, 8\)"
    with pytest.raises(CnnlabError, match=expected):
        layer.forward(torch.zeros(1, 2, 8, 8))


def test_pools_take_four_dimensional_input_and_say_so():
    layer = layer_from_torch(nn.MaxPool2d(2), "2")
    with pytest.raises(CnnlabError, match=r"MaxPool2d '2' expects input of shape \(N, C, H, W\), got \(3, 8, 8\)"):
        layer.forward(torch.zeros(3, 8, 8))


def test_average_pool_with_ceil_mode_is_refused_by_name():
    with pytest.raises(CnnlabError, match="AvgPool2d '4' uses ceil_mode=True"):
        layer_from_torch(nn.AvgPool2d(2, ceil_mode=True), "4")


@pytest.mark.parametrize("kernel", [2, 3, (2, 3)])
def test_tiling_windows_break_ties_like_torch(kernel):
    """Windows that tile the image take the fast path; small integers make ties everywhere."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (2, 3, 6, 6), generator=generator).to(torch.float64).requires_grad_()
    pool = nn.MaxPool2d(kernel)
    expected_y = pool(x)
    dout = random_input(expected_y.shape, seed=1)
    (expected_dx,) = torch.autograd.grad(expected_y, x, dout)
    layer = MaxPool2d(kernel)
    assert torch.equal(layer.forward(x.detach()), expected_y.detach())
    assert torch.equal(layer.backward(dout), expected_dx)
