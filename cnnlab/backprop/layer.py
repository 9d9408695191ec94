"""What every hand-written layer is: a forward that remembers, a backward that uses it.

`forward(x)` computes the output and keeps what the backward pass will need
(the input, the output, a mask). `backward(dout)` receives dL/dy, the gradient
of the loss with respect to the layer's output, and returns dL/dx, the
gradient with respect to its input; on the way it stores dL/dw for each
parameter w in `grads`, under the parameter's name.

Everything is plain tensor arithmetic: no tensor here requires grad, and no
autograd graph is ever recorded. Parameters are plain tensors too; a layer
built from an `nn.Module` holds views that share storage with the module's
parameters, so an update here is an update there.
"""

from __future__ import annotations

from typing import Any

import torch

from cnnlab.errors import CnnlabError


class Layer:
    """Base class: parameters, their gradients, running buffers, train/eval mode, input checks.

    path: where the layer sits in its model ("3", "body.0"), the prefix of its state_dict keys.
    """

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.training = True
        self.params: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        # False when nobody needs dL/dx (the network's first layer: dL/d(image) is never used);
        # layers for which dx is costly then skip computing it and return None.
        self.input_grad = True
        self._cache: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__} '{self.path}'" if self.path else type(self).__name__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, dout: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Layer:
        self.training = mode
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter by its state_dict name ("3.weight"), in the module's order."""
        return dict(self._named("params"))

    def gradients(self) -> dict[str, torch.Tensor]:
        """dL/dw for every parameter, under the same names, as the last backward left them."""
        return dict(self._named("grads"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers: the same keys, order and tensors as the module's state_dict()."""
        return dict(self._named("params", "buffers"))

    def _named(self, *kinds: str) -> list[tuple[str, torch.Tensor]]:
        """(full name, tensor) for this layer's params/grads/buffers; containers override it."""
        named = []
        for kind in kinds:
            named += [(f"{self.path}.{key}" if self.path else key, t) for key, t in getattr(self, kind).items()]
        return named

    def _check_input(self, x: torch.Tensor, ok: bool, expected: str) -> None:
        """Raise a CnnlabError naming this layer when `x` is not the input it takes."""
        if not ok:
            raise CnnlabError(f"{self} expects input of shape {expected}, got {tuple(x.shape)}")

    def _save(self, out_shape: torch.Size, *values: Any) -> None:
        """Keep what backward needs, and the output shape to check dout against."""
        self._cache = (out_shape, values)

    def _take(self, dout: torch.Tensor) -> tuple:
        """What forward saved, checked against `dout`; released, since one forward allows one backward."""
        if self._cache is None:
            raise CnnlabError(f"{self}: backward() needs a forward() first (each forward allows one backward)")
        out_shape, values = self._cache
        if dout.shape != out_shape:
            raise CnnlabError(
                f"{self}: dout has shape {tuple(dout.shape)} but the forward output had shape {tuple(out_shape)}"
            )
        self._cache = None
        return values


def pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """nn.Conv2d and the pooling layers accept 3 or (3, 3); the code below wants (3, 3)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
