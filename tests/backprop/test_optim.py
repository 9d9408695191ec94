import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnlab.backprop.optim import SGD, Adam, ParamGroup, build_optimizer, clip_grad_norm, param_groups
from cnnlab.config import OptimConfig
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model

SHAPES = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4, 3, 3)}


def twin_parameters(seed: int):
    """The same float64 values twice: plain tensors for cnnlab, leaf tensors for torch.optim."""
    generator = torch.Generator().manual_seed(seed)
    ours = {name: torch.randn(shape, dtype=torch.float64, generator=generator) for name, shape in SHAPES.items()}
    theirs = {name: t.clone().requires_grad_() for name, t in ours.items()}
    return ours, theirs


def step_both(ours, optimizer, theirs, torch_optimizer, steps: int, seed: int, lr=lambda step: 0.1) -> None:
    """`steps` updates from the same random gradients, the learning rate changing as a schedule would."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = {name: torch.randn(t.shape, dtype=torch.float64, generator=generator) for name, t in ours.items()}
        for group in torch_optimizer.param_groups:
            group["lr"] = lr(step)
        for name, p in theirs.items():
            p.grad = grads[name].clone()
        torch_optimizer.step()
        optimizer.step(grads, lr(step))


def assert_same(ours, theirs):
    for name in ours:
        assert torch.equal(ours[name], theirs[name].detach()), name


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([0.0, 0.5, 0.9]), st.booleans(), st.sampled_from([0.0, 5e-4, 0.1]),
       st.sampled_from([0.0, 0.3]), st.integers(0, 2**16))  # fmt: skip
def test_sgd_takes_exactly_torch_optim_sgds_steps(momentum, nesterov, weight_decay, dampening, seed):
    if nesterov and (momentum == 0 or dampening):
        nesterov = False  # torch refuses these combinations
    ours, theirs = twin_parameters(seed)
    optimizer = SGD(ours, momentum, nesterov, weight_decay, dampening)
    reference = torch.optim.SGD(theirs.values(), lr=0.1, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay, dampening=dampening)  # fmt: skip
    step_both(ours, optimizer, theirs, reference, 50, seed, lr=lambda step: 0.1 / (1 + step))
    assert_same(ours, theirs)


@settings(max_examples=20, deadline=None)
@given(st.booleans(), st.sampled_from([0.0, 1e-2]), st.sampled_from([(0.9, 0.999), (0.5, 0.9)]), st.integers(0, 2**16))
def test_adam_and_adamw_take_exactly_torch_optims_steps(decoupled, weight_decay, betas, seed):
    ours, theirs = twin_parameters(seed)
    optimizer = Adam(ours, betas, weight_decay=weight_decay, decoupled=decoupled)
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    reference = kind(theirs.values(), lr=1e-2, betas=betas, weight_decay=weight_decay, foreach=False)
    step_both(ours, optimizer, theirs, reference, 50, seed, lr=lambda step: 1e-2 * (0.95**step))
    assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_saved_state_resumes_exactly_through_a_checkpoint_file(name):
    config = OptimConfig(name=name, momentum=0.9, nesterov=True, weight_decay=1e-3)
    straight, _ = twin_parameters(0)
    split, _ = twin_parameters(0)
    generator = torch.Generator().manual_seed(1)
    gradients = [{n: torch.randn(t.shape, dtype=torch.float64, generator=generator) for n, t in straight.items()}
                 for _ in range(10)]  # fmt: skip
    optimizer = build_optimizer(config, straight)
    for grads in gradients:
        optimizer.step(grads, 0.05)
    first = build_optimizer(config, split)
    for grads in gradients[:5]:
        first.step(grads, 0.05)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_optimizer(config, split)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for grads in gradients[5:]:
        resumed.step(grads, 0.05)
    assert_same(straight, split)


def test_state_of_another_optimizer_is_refused():
    params, _ = twin_parameters(0)
    adam_state = Adam(params).state_dict()
    with pytest.raises(CnnlabError, match="the saved optimizer state is for adam, not cnnlab's sgd"):
        SGD(params, momentum=0.9).load_state_dict(adam_state)
    torch_state = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).state_dict()
    with pytest.raises(CnnlabError, match="not cnnlab's sgd"):
        SGD(params, momentum=0.9).load_state_dict(torch_state)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_gradient_clipping_matches_clip_grad_norm(max_norm):
    ours, theirs = twin_parameters(3)
    for name, p in theirs.items():
        p.grad = ours[name].clone()
    expected = torch.nn.utils.clip_grad_norm_(theirs.values(), max_norm)
    norm = clip_grad_norm(ours.values(), max_norm)
    torch.testing.assert_close(norm, expected, rtol=1e-14, atol=0)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].grad, rtol=1e-14, atol=0)


# Two groups over SHAPES: the weights at the schedule's rate with decay, the bias at 3x without.
GROUPS = [ParamGroup(("0.weight", "2.weight"), 1.0, True), ParamGroup(("0.bias",), 3.0, False)]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_parameter_groups_take_torch_optims_steps_with_their_own_rates_and_decay(name):
    config = OptimConfig(name=name, momentum=0.9, nesterov=True, weight_decay=0.05)
    ours, theirs = twin_parameters(5)
    optimizer = build_optimizer(config, ours, GROUPS)
    torch_groups = [{"params": [theirs[n] for n in g.names], "weight_decay": 0.05 if g.decay else 0.0} for g in GROUPS]
    if name == "sgd":
        reference = torch.optim.SGD(torch_groups, lr=0.1, momentum=0.9, nesterov=True)
    else:
        kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        reference = kind(torch_groups, lr=0.1, foreach=False)
    generator = torch.Generator().manual_seed(5)
    for step in range(20):
        lr = 0.05 / (1 + step)
        grads = {n: torch.randn(t.shape, dtype=torch.float64, generator=generator) for n, t in ours.items()}
        for group, ours_group in zip(reference.param_groups, GROUPS):
            group["lr"] = lr * ours_group.lr_scale
        for n, p in theirs.items():
            p.grad = grads[n].clone()
        reference.step()
        optimizer.step(grads, lr)
    assert_same(ours, theirs)


def test_a_model_is_grouped_by_head_and_by_decay_and_frozen_parameters_are_left_out():
    model = create_model("lenet5", (1, 28, 28), 10)
    assert param_groups(model, OptimConfig()) == [ParamGroup(tuple(name for name, _ in model.named_parameters()))]
    model[0].requires_grad_(False)  # the first convolution, frozen
    groups = param_groups(model, OptimConfig(head_lr_mult=10.0, bias_decay=False))
    assert groups == [
        ParamGroup(("3.weight", "7.weight", "9.weight"), 1.0, True),
        ParamGroup(("3.bias", "7.bias", "9.bias"), 1.0, False),
        ParamGroup(("11.weight",), 10.0, True),
        ParamGroup(("11.bias",), 10.0, False),
    ]
    norms = param_groups(create_model("resnet8", (1, 16, 16), 10), OptimConfig(bias_decay=False))
    assert "1.weight" in norms[1].names and "1.bias" in norms[1].names and not norms[1].decay  # batch norm's


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_grouped_state_resumes_exactly_through_a_checkpoint_file(name):
    config = OptimConfig(name=name, momentum=0.9, weight_decay=0.05)
    straight, _ = twin_parameters(6)
    split, _ = twin_parameters(6)
    generator = torch.Generator().manual_seed(6)
    gradients = [{n: torch.randn(t.shape, dtype=torch.float64, generator=generator) for n, t in straight.items()}
                 for _ in range(8)]  # fmt: skip
    optimizer = build_optimizer(config, straight, GROUPS)
    for grads in gradients:
        optimizer.step(grads, 0.05)
    first = build_optimizer(config, split, GROUPS)
    for grads in gradients[:4]:
        first.step(grads, 0.05)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_optimizer(config, split, GROUPS)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for grads in gradients[4:]:
        resumed.step(grads, 0.05)
    assert_same(straight, split)
