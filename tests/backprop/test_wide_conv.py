"""The compiled first-layer convolution against torch's conv2d: values, weight and bias gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.backprop.wide_conv import WideConv2d


@settings(max_examples=15, deadline=None)  # each new shape compiles the loops (~1 s)
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
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_values_and_gradients_equal_torchs_up_to_rounding(n, c, o, h, w, kh, kw, ph, pw, bias, seed):
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return
    generator = torch.Generator().manual_seed(seed)
    # float64, so that rounding stays far below the tolerance whatever the order of the sums
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64)
    weight = torch.randn(o, c, kh, kw, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(o, generator=generator, dtype=torch.float64, requires_grad=True) if bias else None
    params = [weight, b] if bias else [weight]
    expected = F.conv2d(x, weight, b, padding=(ph, pw))
    dy = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, params, dy)

    y = WideConv2d.apply(x, weight, b, (ph, pw))
    grads = torch.autograd.grad(y, params, dy)

    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lenet5s_first_convolution_in_float32_is_as_accurate_as_torchs():
    """The shapes the compiled loops were made for (1 -> 6 channels, 5 x 5, 28 x 28 images), in
    float32: no further from float64's answer than torch's own float32 convolution."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 28, 28, generator=generator)
    weight = (0.2 * torch.randn(6, 1, 5, 5, generator=generator)).requires_grad_()
    b = torch.randn(6, generator=generator).requires_grad_()
    dy = torch.randn(192, 6, 24, 24, generator=generator)

    def run(conv, dtype):
        w, bias = weight.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
        y = conv(x.to(dtype), w, bias)
        return [y.double(), *(g.double() for g in torch.autograd.grad(y, [w, bias], dy.to(dtype)))]

    exact = run(F.conv2d, torch.float64)
    torchs = run(F.conv2d, torch.float32)
    compiled = run(lambda x, w, bias: WideConv2d.apply(x, w, bias, (0, 0)), torch.float32)
    for ours, theirs, truth in zip(compiled, torchs, exact):  # output, weight gradient, bias gradient
        assert (ours - truth).abs().max() <= 1.5 * (theirs - truth).abs().max() + 1e-6


def test_the_input_gets_no_gradient_and_nan_spreads_as_in_torch():
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 2] = float("nan")
    weight = torch.ones(2, 1, 3, 3, requires_grad=True)
    y = WideConv2d.apply(x, weight, None, (0, 0))
    assert torch.equal(y.isnan(), F.conv2d(x, weight).isnan()) and y.isnan().sum() == 2 * 9
    with pytest.raises(RuntimeError):  # x needs no gradient: there is none to ask for
        torch.autograd.grad(y.nansum(), [x])
