"""A model's layer table: what each layer outputs, how many weights it holds, its work and its view.

`layer_table(model, in_shape)` runs one blank image through `model` (eval mode,
no gradients) and records, for every layer in the order it runs:

- the output shape of one image;
- its own parameters (not its children's, so the column adds up to the model's);
- its multiply-adds for one image, counted by `torch.utils.flop_counter` (which
  counts the matrix products and convolutions: 2 FLOPs a multiply-add) between
  the layer's start and end, less what its sub-layers already count;
- its receptive field: how many input pixels (height x width) one of its output
  values depends on, from the kernel sizes, strides and dilations on the way.

A layer is every module that is not a plain `nn.Sequential`: the leaves (Conv2d,
ReLU, ...) and blocks with a forward of their own (a residual block's sum and ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.models.resnet import Residual

# Layers that change no value's view of the input: their output i depends on their input i alone.
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout, nn.Identity)
WHOLE_IMAGE = None  # a receptive field that is every pixel of the input (after a Linear or a global pool)


@dataclass(frozen=True)
class LayerRow:
    """One layer. output_shape: one image's, (C, H, W) or (F,); receptive_field: (h, w) or WHOLE_IMAGE."""

    name: str  # its path in the model, as in the state_dict ("3", "4.body.0")
    type: str
    output_shape: tuple[int, ...]
    parameters: int
    mult_adds: int
    receptive_field: tuple[int, int] | None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "type": self.type, "output_shape": list(self.output_shape),
            "parameters": self.parameters, "mult_adds": self.mult_adds,
            "receptive_field": list(self.receptive_field) if self.receptive_field else "whole image",
        }  # fmt: skip


@dataclass(frozen=True)
class LayerTable:
    in_shape: tuple[int, int, int]
    rows: list[LayerRow]

    @property
    def total_parameters(self) -> int:
        return sum(r.parameters for r in self.rows)

    @property
    def total_mult_adds(self) -> int:
        return sum(r.mult_adds for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.in_shape),
            "layers": [r.to_dict() for r in self.rows],
            "total_parameters": self.total_parameters,
            "total_mult_adds": self.total_mult_adds,
        }

    def text(self) -> str:
        """The table as aligned columns, totals last."""
        header = ("layer", "type", "output", "parameters", "mult-adds", "receptive field")
        lines = [(r.name, r.type, _shape_text(r.output_shape), f"{r.parameters:,}", f"{r.mult_adds:,}",
                  receptive_field_text(r.receptive_field)) for r in self.rows]  # fmt: skip
        lines.append(("total", "", "", f"{self.total_parameters:,}", f"{self.total_mult_adds:,}", ""))
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
        numeric = (False, False, False, True, True, False)
        return "\n".join(
            "  ".join(cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(line, widths, numeric)).rstrip()
            for line in [header, *lines]
        )


def receptive_field_text(field: tuple[int, int] | None) -> str:
    return "whole image" if field is None else f"{field[0]}x{field[1]}"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


@dataclass(frozen=True)
class _View:
    """What one output value of a layer sees of the input, per axis (height, width).

    size: the receptive field's side in input pixels; jump: how many input pixels apart two
    neighbouring output values' fields start (the product of the strides so far).
    """

    size: tuple[int, int]
    jump: tuple[int, int]


def _view_after(module: nn.Module, view: _View | None, out: torch.Tensor) -> _View | None:
    """The view of `module`'s output, given its input's (None: the whole image, or unknown)."""
    if view is None or isinstance(module, _ELEMENTWISE):
        return view
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        size = tuple(s + d * (k - 1) * j for s, k, d, j in zip(view.size, kernel, dilation, view.jump))
        return _View(size, tuple(j * s for j, s in zip(view.jump, stride)))  # type: ignore[arg-type]
    return None  # Linear, Flatten, a global pool (the registered models' other layers): every output sees it all


def recurrent_mult_adds(rnn: nn.RNN | nn.LSTM, steps: int) -> int:
    """Per image: each step multiplies the input (D) and the last state (H) into every gate's H units."""
    gates = 4 if isinstance(rnn, nn.LSTM) else 1
    return steps * gates * rnn.hidden_size * (rnn.input_size + rnn.hidden_size)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def layer_table(model: nn.Module, in_shape: tuple[int, int, int]) -> LayerTable:
    """The table of `model` (put in eval mode for the count, then back) for (C, H, W) = in_shape images."""
    counted = {m for name, m in model.named_modules() if name and not isinstance(m, nn.Sequential)}
    names = {m: name for name, m in model.named_modules()}
    views: dict[nn.Module, _View | None] = {}
    flops_at_start: dict[nn.Module, int] = {}
    flops_inside: dict[nn.Module, int] = {}
    outputs: dict[nn.Module, tuple[int, ...]] = {}
    order: list[nn.Module] = []
    input_views: dict[int, tuple[torch.Tensor, _View | None]] = {}  # id(tensor) -> (tensor kept alive, its view)

    by_hand = [0]  # FLOPs torch's counter does not see (its fused recurrent kernels), counted here

    def flops_so_far() -> int:
        return counter.get_total_flops() + by_hand[0]

    def before(module: nn.Module, args: tuple) -> None:
        flops_at_start[module] = flops_so_far()

    def after(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, (nn.RNN, nn.LSTM)):
            by_hand[0] += 2 * recurrent_mult_adds(module, steps=args[0].shape[1])  # args[0]: (N, T, D)
        flops_inside[module] = flops_so_far() - flops_at_start[module]
        _, seen = input_views.get(id(args[0]), (None, None))
        if isinstance(module, nn.Sequential):  # its output is its last layer's (or, empty, its input)
            view = input_views[id(out)][1]
        elif isinstance(module, Residual):  # the sum of both branches sees what the wider one sees
            branches = [views[module.body], views[module.shortcut]]
            view = None if None in branches else max(branches, key=lambda v: v.size)
        else:
            view = _view_after(module, seen, out)
        views[module] = view
        input_views[id(out)] = (out, view)
        if module in counted:  # a recurrent layer gives (outputs, states): its shape is the outputs'
            outputs[module] = tuple((out[0] if isinstance(out, tuple) else out).shape[1:])
            order.append(module)

    x = torch.zeros(1, *in_shape)
    input_views[id(x)] = (x, _View((1, 1), (1, 1)))
    handles = [h for m in names for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows = []
    for module in order:
        # A block's own work: what ran inside it less what its sub-layers (counted or not) account for.
        children = sum(flops_inside.get(child, 0) for child in module.children())
        rows.append(LayerRow(
            name=names[module],
            type=type(module).__name__,
            output_shape=outputs[module],
            parameters=sum(p.numel() for p in module.parameters(recurse=False)),
            mult_adds=(flops_inside[module] - children) // 2,
            receptive_field=views[module].size if views[module] is not None else WHOLE_IMAGE,
        ))  # fmt: skip
    return LayerTable(tuple(in_shape), rows)  # type: ignore[arg-type]
