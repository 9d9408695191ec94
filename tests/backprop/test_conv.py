import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.backprop.conv import Conv2d
from cnnlab.backprop.network import layer_from_torch
from cnnlab.errors import CnnlabError
from tests.backprop.conftest import assert_matches_torch, random_input


@st.composite
def convolutions(draw):
    """An nn.Conv2d (any stride, padding, dilation, groups) and an input it can take."""
    groups = draw(st.sampled_from([1, 1, 2]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    bias = draw(st.booleans())
    # At least one output position: H + 2p >= d (k - 1) + 1.
    h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]) + draw(st.integers(0, 5))
    w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]) + draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding, dilation, groups, bias)
    x = random_input((draw(st.integers(1, 3)), in_channels, h, w), seed)
    return conv, x


@settings(max_examples=80, deadline=None)
@given(convolutions())
def test_conv2d_gradients_match_autograd_and_finite_differences(case):
    conv, x = case
    assert_matches_torch(conv, x)


def im2col_backward(x, w, dout, stride, padding):
    """The textbook route, spelled out: patches X (N, C*kh*kw, L); dW = sum_n dY X^T; dX = col2im(W^T dY)."""
    n, o = dout.shape[:2]
    columns = F.unfold(x, w.shape[2:], padding=padding, stride=stride)  # (N, C*kh*kw, L)
    dy = dout.reshape(n, o, -1)  # (N, O, L)
    dw = torch.einsum("nol,nkl->ok", dy, columns).view_as(w)
    db = dy.sum((0, 2))
    dcolumns = torch.einsum("ok,nol->nkl", w.reshape(o, -1), dy)
    dx = F.fold(dcolumns, x.shape[2:], w.shape[2:], padding=padding, stride=stride)
    return dx, dw, db


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (3, 2)])
def test_conv2d_backward_is_the_im2col_chain_rule(stride, padding):
    x = random_input((2, 3, 9, 8), seed=1)
    w, b = random_input((4, 3, 3, 2), seed=2), random_input((4,), seed=3)
    layer = Conv2d(w, b, stride, padding)
    y = layer.forward(x)
    dout = random_input(y.shape, seed=4)
    dx = layer.backward(dout)
    expected_dx, expected_dw, expected_db = im2col_backward(x, w, dout, stride, padding)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.grads["weight"], expected_dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.grads["bias"], expected_db, rtol=1e-12, atol=1e-12)


def test_the_first_layer_skips_the_input_gradient_but_not_the_weights():
    conv = nn.Conv2d(1, 2, 3).double()
    layer = layer_from_torch(conv)
    layer.input_grad = False
    x = random_input((2, 1, 5, 5), seed=0)
    layer.forward(x)
    assert layer.backward(torch.ones(2, 2, 3, 3, dtype=torch.float64)) is None
    assert layer.grads["weight"].shape == (2, 1, 3, 3) and layer.grads["bias"].shape == (2,)


def test_same_and_valid_padding_follow_torch():
    for padding in ("same", "valid"):
        assert_matches_torch(nn.Conv2d(2, 3, 3, padding=padding), random_input((1, 2, 6, 6), seed=0))


def test_wrong_channels_name_the_layer_and_both_shapes():
    layer = layer_from_torch(nn.Conv2d(3, 4, 3), "features.0")
    expected = r"Conv2d 'features.0' expects input of shape \(N, 3, H, W\), got \(2, 1, 8, 8\)"
    with pytest.raises(CnnlabError, match=expected):
        layer.forward(torch.zeros(2, 1, 8, 8))


def test_an_image_smaller_than_the_kernel_is_a_clear_error():
    layer = layer_from_torch(nn.Conv2d(1, 1, 5), "0")
    with pytest.raises(CnnlabError, match=r"Conv2d '0' cannot take input of shape \(1, 1, 3, 3\)"):
        layer.forward(torch.zeros(1, 1, 3, 3))


def test_padding_modes_other_than_zeros_are_refused():
    with pytest.raises(CnnlabError, match="reflect"):
        layer_from_torch(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), "0")
