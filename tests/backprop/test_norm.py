import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cnnlab.backprop.network import layer_from_torch
from cnnlab.errors import CnnlabError
from tests.backprop.conftest import assert_matches_torch, random_input


@st.composite
def batch_norms(draw):
    """A BatchNorm1d or 2d with any options, in training or evaluation mode, and an input for it."""
    c = draw(st.integers(1, 4))
    two_d = draw(st.booleans())
    kind = nn.BatchNorm2d if two_d else nn.BatchNorm1d
    momentum = draw(st.sampled_from([0.1, 0.5, None]))
    module = kind(c, eps=draw(st.sampled_from([1e-5, 1e-3])), momentum=momentum, affine=draw(st.booleans()),
                  track_running_stats=draw(st.booleans()))  # fmt: skip
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.affine:
            module.weight.normal_(1.0, 0.5, generator=generator)
            module.bias.normal_(0.0, 0.5, generator=generator)
        if module.track_running_stats:
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    module.train(draw(st.booleans()))
    n = draw(st.integers(2, 4))
    spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4))) if two_d else draw(st.sampled_from([(), (3,)]))
    return module, random_input((n, c, *spatial), seed)


@settings(max_examples=80, deadline=None)
@given(batch_norms())
def test_batch_norm_gradients_match_in_training_and_evaluation(case):
    module, x = case
    assert_matches_torch(module, x)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_torch_over_many_batches(momentum):
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3, momentum=momentum).double()
    module = copy.deepcopy(reference)
    layer = layer_from_torch(module)
    for step in range(20):
        x = random_input((4, 3, 5, 5), seed=step) * (step + 1) + step  # moving statistics
        with torch.no_grad():
            reference(x)
        layer.forward(x)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert int(module.num_batches_tracked) == 20


def test_running_statistics_use_the_unbiased_variance():
    layer = layer_from_torch(nn.BatchNorm1d(1, momentum=1.0).double())
    layer.forward(torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    # mean 2; biased variance 1 normalizes, the unbiased 2 is what is kept.
    assert layer.buffers["running_mean"].item() == 2.0 and layer.buffers["running_var"].item() == 2.0


def test_evaluation_uses_running_statistics_and_leaves_them_alone():
    module = nn.BatchNorm2d(2).double().eval()
    module.running_mean.fill_(1.0)
    layer = layer_from_torch(module)
    layer.eval()
    before = copy.deepcopy(module.state_dict())
    y = layer.forward(torch.ones(1, 2, 3, 3, dtype=torch.float64))
    assert torch.allclose(y, torch.zeros_like(y))
    for key, value in before.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_one_value_per_channel_cannot_be_normalized_in_training():
    layer = layer_from_torch(nn.BatchNorm1d(3), "fc.1")
    expected = r"BatchNorm1d 'fc.1' needs more than one value per channel in training, got \(1, 3\)"
    with pytest.raises(CnnlabError, match=expected):
        layer.forward(torch.zeros(1, 3))


def test_a_wrong_number_of_channels_names_the_layer():
    layer = layer_from_torch(nn.BatchNorm2d(16), "1")
    expected = r"BatchNorm2d '1' expects input of shape \(N, 16, H, W\), got \(2, 8, 4, 4\)"
    with pytest.raises(CnnlabError, match=expected):
        layer.forward(torch.zeros(2, 8, 4, 4))
