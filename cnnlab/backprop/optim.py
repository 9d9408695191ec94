"""Parameter updates: SGD (momentum, Nesterov, weight decay), Adam and AdamW, and gradient clipping.

Each optimizer updates the parameters in place from their gradients, following
torch.optim's arithmetic operation for operation, so both engines take the same
steps. Parameters and gradients are dicts keyed by state_dict name ("0.weight");
the optimizer's state is keyed the same way and holds plain tensors and numbers,
which is what a checkpoint stores.

Parameters come in groups, as torch.optim's param_groups: each group scales the
learning rate by its own factor and either takes the weight decay or not
(`param_groups`: the head at --head-lr-mult times the rate, and with
--no-bias-decay, biases and batch-norm weights without decay). The groups are
rebuilt from the config on resume, so the saved state needs only the names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.config import OptimConfig
from cnnlab.errors import CnnlabError
from cnnlab.models.parts import head_layer

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamGroup:
    """Parameters (by name) updated at lr_scale times the schedule's rate, with the weight decay or without."""

    names: tuple[str, ...]
    lr_scale: float = 1.0
    decay: bool = True


def param_groups(model: nn.Module, config: OptimConfig) -> list[ParamGroup]:
    """`model`'s trainable parameters grouped by (learning-rate scale, decayed), in the model's order.

    The head (the last Linear layer) is scaled by --head-lr-mult; with --no-bias-decay,
    biases and batch-norm weights (the 1-d parameters) take no weight decay. Parameters
    that share both settings share a group, so the defaults give one group, as before.
    Frozen parameters (requires_grad False) are in none.
    """
    head = head_layer(model)
    groups: dict[tuple[float, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = config.head_lr_mult if name.rpartition(".")[0] == head else 1.0
            groups.setdefault((scale, config.bias_decay or p.dim() > 1), []).append(name)
    return [ParamGroup(tuple(names), scale, decay) for (scale, decay), names in groups.items()]


def _each_parameter(
    groups: Sequence[ParamGroup], grads: Tensors, lr: float, weight_decay: float
) -> Iterator[tuple[str, torch.Tensor, float, float]]:
    """(name, gradient, learning rate, weight decay) for every parameter, as its group sets them."""
    for group in groups:
        for name in group.names:
            yield name, grads[name], lr * group.lr_scale, weight_decay if group.decay else 0.0


class SGD:
    """Stochastic gradient descent as torch.optim.SGD does it, with g = dL/dw:

        g <- g + weight_decay * w                       (L2 penalty)
        v <- g on the first step, else momentum * v + (1 - dampening) * g
        g <- g + momentum * v  (Nesterov)   or   g <- v  (classical momentum)
        w <- w - lr * g
    """

    kind = "sgd"

    def __init__(
        self, params: Tensors, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
        dampening: float = 0.0, groups: Sequence[ParamGroup] | None = None,
    ) -> None:  # fmt: skip
        self.params = params
        self.momentum, self.nesterov, self.weight_decay, self.dampening = momentum, nesterov, weight_decay, dampening
        self.groups = list(groups) if groups is not None else [ParamGroup(tuple(params))]
        self.state: dict[str, Tensors] = {}  # name -> {"momentum_buffer": v}, from the first step on

    def step(self, grads: Tensors, lr: float) -> None:
        """grads: a gradient for every parameter of the groups, by name; lr: the schedule's rate, scaled per group."""
        for name, g, rate, weight_decay in _each_parameter(self.groups, grads, lr, self.weight_decay):
            w = self.params[name]
            if weight_decay:
                g = g.add(w, alpha=weight_decay)
            if self.momentum:
                if name not in self.state:
                    self.state[name] = {"momentum_buffer": g.clone()}
                    v = self.state[name]["momentum_buffer"]
                else:
                    v = self.state[name]["momentum_buffer"]
                    v.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
                g = g.add(v, alpha=self.momentum) if self.nesterov else v
            w.add_(g, alpha=-rate)

    def state_dict(self) -> dict:
        return _state_dict(self.kind, self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = _load_state(self.kind, state, self.params)


class Adam:
    """Adam (Kingma & Ba, 2015) as torch.optim.Adam does it; `decoupled` makes it AdamW.

    At step t, with g = dL/dw:

        Adam:  g <- g + weight_decay * w        AdamW: w <- w * (1 - lr * weight_decay)
        m <- beta1 * m + (1 - beta1) * g        (first moment: a running mean of g)
        v <- beta2 * v + (1 - beta2) * g^2      (second moment: a running mean of g^2)
        w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    m and v start at 0, so early on they underestimate; dividing by 1 - beta^t (the bias
    correction) undoes that.
    """

    def __init__(
        self, params: Tensors, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, decoupled: bool = False, groups: Sequence[ParamGroup] | None = None,
    ) -> None:  # fmt: skip
        self.params = params
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.decoupled = eps, weight_decay, decoupled
        self.kind = "adamw" if decoupled else "adam"
        self.groups = list(groups) if groups is not None else [ParamGroup(tuple(params))]
        self.state: dict[str, dict] = {}  # name -> {"step": t, "exp_avg": m, "exp_avg_sq": v}

    def step(self, grads: Tensors, lr: float) -> None:
        """grads: a gradient for every parameter of the groups, by name; lr: the schedule's rate, scaled per group."""
        for name, g, rate, weight_decay in _each_parameter(self.groups, grads, lr, self.weight_decay):
            w = self.params[name]
            if name not in self.state:
                self.state[name] = {"step": 0, "exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)}
            state = self.state[name]
            state["step"] += 1
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            if weight_decay:
                if self.decoupled:
                    w.mul_(1 - rate * weight_decay)
                else:
                    g = g.add(w, alpha=weight_decay)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            step_size = rate / (1 - self.beta1**t)
            denominator = (v.sqrt() / (1 - self.beta2**t) ** 0.5).add_(self.eps)
            w.addcdiv_(m, denominator, value=-step_size)

    def state_dict(self) -> dict:
        return _state_dict(self.kind, self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = _load_state(self.kind, state, self.params)


Optimizer = SGD | Adam


def build_optimizer(config: OptimConfig, params: Tensors, groups: Sequence[ParamGroup] | None = None) -> Optimizer:
    """The optimizer `config` names, over `params` in `groups` (default: one group of all of them).

    The learning rate comes with each step.
    """
    if config.name == "sgd":
        return SGD(params, config.momentum, config.nesterov, config.weight_decay, groups=groups)
    if config.name in ("adam", "adamw"):
        return Adam(params, tuple(config.betas), weight_decay=config.weight_decay, decoupled=config.name == "adamw",
                    groups=groups)  # fmt: skip
    raise CnnlabError(f"unknown optimizer '{config.name}': choose one of sgd, adam, adamw")


def clip_grad_norm(grads: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients in place so that their global 2-norm is at most `max_norm`.

    Like torch.nn.utils.clip_grad_norm_: the norm of all gradients taken as one vector,
    and the factor max_norm / (norm + 1e-6) capped at 1. Returns the norm before clipping.
    """
    grads = list(grads)
    total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    # Multiplying by a capped tensor factor, rather than testing `norm > max_norm` in
    # Python, keeps a GPU from waiting for the norm to reach the CPU.
    factor = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor)
    return total_norm


def _state_dict(kind: str, state: dict[str, dict]) -> dict:
    """{"optimizer": kind, "state": {name: {key: tensor or int}}}: loadable with weights_only=True."""
    return {"optimizer": kind, "state": {name: dict(entry) for name, entry in state.items()}}


def _load_state(kind: str, saved: dict, params: Tensors) -> dict[str, dict]:
    if not isinstance(saved, dict) or saved.get("optimizer") != kind or not isinstance(saved.get("state"), dict):
        found = saved.get("optimizer", "an unknown format") if isinstance(saved, dict) else type(saved).__name__
        raise CnnlabError(f"the saved optimizer state is for {found}, not cnnlab's {kind}: it cannot be resumed here")
    state = {}
    for name, entry in saved["state"].items():
        if name not in params:
            raise CnnlabError(f"the saved optimizer state has parameter '{name}', which this model does not have")
        w = params[name]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.shape != w.shape:
                raise CnnlabError(
                    f"the saved optimizer state for '{name}' has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(w.shape)}"
                )
        # Cloned onto the parameter's device: a checkpoint is loaded on the CPU, training may run elsewhere.
        state[name] = {k: v.to(w.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
    return state
