"""The compiled convolution and pool against torch's: values, input, weight and bias gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.fast.forward import ConvPool2d


def reference(x, weight, bias, padding, pool, relu):
    """torch's conv2d, then its max-pool over `pool` windows and its ReLU (when asked for)."""
    y = F.conv2d(x, weight, bias, padding=padding)
    if pool != (1, 1):
        y = F.max_pool2d(y, pool)
    return F.relu(y) if relu else y


@settings(max_examples=20, deadline=None)  # each new shape compiles the loops (~1 s)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    o=st.integers(1, 7),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    pool=st.sampled_from([(1, 1), (2, 2), (2, 3), (3, 1)]),
    relu=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_values_and_gradients_equal_torchs_up_to_rounding(n, c, o, h, w, kh, kw, ph, pw, pool, relu, bias, seed):
    if h + 2 * ph - kh + 1 < pool[0] or w + 2 * pw - kw + 1 < pool[1]:
        return
    generator = torch.Generator().manual_seed(seed)
    # float64, so that rounding stays far below the tolerance whatever the order of the sums
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(o, c, kh, kw, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(o, generator=generator, dtype=torch.float64, requires_grad=True) if bias else None
    params = [x, weight, b] if bias else [x, weight]
    expected = reference(x, weight, b, (ph, pw), pool, relu)
    dy = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, params, dy)

    y = ConvPool2d.apply(x, weight, b, (ph, pw), pool, relu)
    grads = torch.autograd.grad(y, params, dy)

    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", [0.5, 0.0, -0.5])
def test_tied_windows_send_their_gradient_to_the_first_maximum_and_the_relu_cuts_at_zero(level):
    """Zero weights make every output the bias: every window a tie, and the weight gradient shows
    which position took each window's gradient."""
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    weight = torch.zeros(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.full((3,), level, dtype=torch.float64, requires_grad=True)
    expected = reference(x, weight, bias, (1, 1), (2, 2), True)
    dy = torch.randn(expected.shape, dtype=torch.float64)
    y = ConvPool2d.apply(x, weight, bias, (1, 1), (2, 2), True)
    assert torch.equal(y, expected)
    for got, want in zip(torch.autograd.grad(y, [weight, bias], dy), torch.autograd.grad(expected, [weight, bias], dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert (got.abs().sum() > 0) == (level > 0)  # a maximum <= 0 passes no gradient through the ReLU


def test_lenet5s_first_convolution_in_float32_is_as_accurate_as_torchs():
    """The shapes the compiled loops were made for (1 -> 6 channels, 5 x 5, 28 x 28 images, then
    ReLU and a 2 x 2 pool), in float32: no further from float64's answer than torch's own float32."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 28, 28, generator=generator)
    weight = (0.2 * torch.randn(6, 1, 5, 5, generator=generator)).requires_grad_()
    b = torch.randn(6, generator=generator).requires_grad_()
    dy = torch.randn(192, 6, 12, 12, generator=generator)

    def run(stage, dtype):
        w, bias = weight.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
        y = stage(x.to(dtype), w, bias)
        return [y.double(), *(g.double() for g in torch.autograd.grad(y, [w, bias], dy.to(dtype)))]

    def torchs(x, w, bias):
        return reference(x, w, bias, (0, 0), (2, 2), True)

    exact = run(torchs, torch.float64)
    theirs32 = run(torchs, torch.float32)
    compiled = run(lambda x, w, bias: ConvPool2d.apply(x, w, bias, (0, 0), (2, 2), True), torch.float32)
    for ours, theirs, truth in zip(compiled, theirs32, exact):  # output, weight gradient, bias gradient
        assert (ours - truth).abs().max() <= 1.5 * (theirs - truth).abs().max() + 1e-6


def test_nan_spreads_as_in_torch():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 2] = float("nan")
    weight = torch.ones(2, 1, 3, 3, requires_grad=True)
    for pool, relu in (((1, 1), False), ((2, 2), True)):
        y = ConvPool2d.apply(x, weight, None, (0, 0), pool, relu)
        assert torch.equal(y.isnan(), reference(x, weight, None, (0, 0), pool, relu).isnan()) and y.isnan().any()
