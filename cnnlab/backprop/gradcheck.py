"""Checking the hand-written gradients, layer by layer, against two independent references.

For one model, in float64, each layer gets the input it sees inside the model
and a random upstream gradient dout; then its hand-written dx and dw are
compared with
  - torch.autograd on the same torch module (should agree to rounding: <= 1e-10), and
  - central finite differences, (f(t + h) - f(t - h)) / 2h with f = sum(dout * layer(x)),
    at a sample of coordinates of every input and parameter (<= 1e-6).
Errors are relative per tensor: max |a - b| / max(max |a|, max |b|, 1e-2). The
floor keeps a gradient that is all but zero (batch norm over two values) from
being judged on rounding noise: finite differences resolve only about 1e-9.

Finite differences are only right where the layer is differentiable. A coordinate
within reach of a kink (a ReLU input at 0, a tie in a max-pool window) is found by
a wider second difference, |f(t + H) - 2 f(t) + f(t - H)| / H, which is about
H * f'' on smooth ground but the size of the slope's jump at a kink; such points
are skipped and counted. A large one that shrinks tenfold with H is curvature, not
a kink (batch norm over a few values curves sharply), and the point is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.backprop.layer import Layer
from cnnlab.backprop.losses import SoftmaxCrossEntropy
from cnnlab.backprop.network import Sequential
from cnnlab.models import create_model

AUTOGRAD_TOLERANCE = 1e-10
FINITE_DIFFERENCE_TOLERANCE = 1e-6
STEP = 1e-6  # h: small enough for the O(h^2) error, large enough for float64 rounding (~1e-16 / h)
KINK_PROBE = 1e-4  # H: the wider step that looks for kinks
KINK_SLOPE_JUMP = 1e-2  # a second difference / H above this share of the gradient's scale is a kink
SCALE_FLOOR = 1e-2  # relative errors of gradients smaller than this are taken against it
# f's own rounding, ~ulps * eps * |f| per evaluation, reaches a central difference divided by
# 2h: at |f| = 30 that is ~1e-8, above FINITE_DIFFERENCE_TOLERANCE * SCALE_FLOOR. A gradient
# is judged against at least the scale at which that noise stays within the tolerance.
ROUNDING_ULPS = 8
LABEL_SMOOTHING = 0.1  # the loss row checks smoothing too


@dataclass(frozen=True)
class LayerCheck:
    """One layer's worst errors over its gradients (input and parameters)."""

    layer: str  # "3 Conv2d"
    gradients: tuple[str, ...]  # ("input", "weight", "bias")
    autograd_abs: float
    autograd_rel: float
    fd_abs: float
    fd_rel: float
    fd_points: int  # coordinates compared with finite differences
    fd_skipped: int  # coordinates skipped next to a kink

    @property
    def passed(self) -> bool:
        return self.autograd_rel <= AUTOGRAD_TOLERANCE and self.fd_rel <= FINITE_DIFFERENCE_TOLERANCE

    def to_dict(self) -> dict:
        return {**asdict(self), "gradients": list(self.gradients), "passed": self.passed}


@dataclass(frozen=True)
class GradcheckReport:
    model: str
    input_shape: tuple[int, ...]  # (N, C, H, W)
    seed: int
    rows: list[LayerCheck]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "dtype": "float64",
            "seed": self.seed,
            "tolerances": {"autograd_rel": AUTOGRAD_TOLERANCE, "finite_difference_rel": FINITE_DIFFERENCE_TOLERANCE},
            "passed": self.passed,
            "layers": [row.to_dict() for row in self.rows],
        }

    def table(self) -> str:
        width = max(len(row.layer) for row in self.rows)
        lines = [
            f"gradcheck of {self.model} on input {tuple(self.input_shape)}, float64, seed {self.seed}",
            f"{'':<{width}}  {'':<19}  {'vs autograd':^17}  {'vs finite differences':^27}",
            f"{'layer':<{width}}  {'gradients':<19}  {'max abs':>8} {'max rel':>8}  "
            f"{'max abs':>8} {'max rel':>8} {'points':>9}",
        ]
        for row in self.rows:
            names = " ".join(row.gradients) if len(row.gradients) <= 3 else f"input +{len(row.gradients) - 1} params"
            points = f"{row.fd_points}" + (f"+{row.fd_skipped}k" if row.fd_skipped else "")
            lines.append(
                f"{row.layer:<{width}}  {names:<19}  {row.autograd_abs:8.1e} {row.autograd_rel:8.1e}  "
                f"{row.fd_abs:8.1e} {row.fd_rel:8.1e} {points:>9}  {'ok' if row.passed else 'FAIL'}"
            )
        lines.append(
            f"tolerances (max rel): autograd {AUTOGRAD_TOLERANCE:.0e}, finite differences "
            f"{FINITE_DIFFERENCE_TOLERANCE:.0e}; +Nk = points skipped next to a kink"
        )
        failed = [row.layer for row in self.rows if not row.passed]
        if failed:
            lines.append(f"{len(failed)} of {len(self.rows)} layers over tolerance: {', '.join(failed)}")
        else:
            lines.append(f"all {len(self.rows)} layers within tolerance")
        return "\n".join(lines)


def check_model(
    model: str = "lenet5",
    in_shape: tuple[int, int, int] = (1, 28, 28),
    batch_size: int = 2,
    num_classes: int = 10,
    seed: int = 0,
    points: int = 12,
) -> GradcheckReport:
    """Registered model `model`, built for `in_shape` images and `num_classes` classes."""
    torch.manual_seed(seed)
    return check_sequential(create_model(model, in_shape, num_classes), model, (batch_size, *in_shape), seed, points)


def check_sequential(
    module: nn.Sequential, name: str, input_shape: tuple[int, ...], seed: int = 0, points: int = 12
) -> GradcheckReport:
    """Every top-level layer of `module` (converted to float64, in training mode), then the loss.

    input_shape: (N, C, H, W) of the random batch; `points` coordinates per tensor get
    finite differences.
    """
    module = module.double().train()
    network = Sequential.from_torch(module)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, dtype=torch.float64, generator=generator)
    rows = []
    for child, layer in zip(module, network.layers):
        # Every evaluation of this layer starts from this random state: the same dropout mask each time.
        rng_state = torch.get_rng_state()
        with torch.no_grad():
            y = child(x)
        dout = torch.randn(y.shape, dtype=torch.float64, generator=generator)
        rows.append(check_layer(child, layer, x, dout, rng_state, points, generator))
        x = y
    labels = torch.randint(x.shape[1], (x.shape[0],), generator=generator)
    rows.append(check_loss(x, labels, points, generator))
    return GradcheckReport(name, tuple(input_shape), seed, rows)


def check_layer(
    module: nn.Module, layer: Layer, x: torch.Tensor, dout: torch.Tensor, rng_state: torch.Tensor, points: int,
    generator: torch.Generator,
) -> LayerCheck:  # fmt: skip
    """Compare `layer` (built from `module`, sharing its parameters) with autograd and finite differences.

    x: the layer's float64 input; dout: a float64 upstream gradient shaped like its output.
    `rng_state` (torch.get_rng_state()) is restored before every forward, so random layers
    (dropout) draw the same mask each time.
    """
    x = x.detach().clone()
    torch.set_rng_state(rng_state)
    manual = hand_written_gradients(layer, x, dout)
    torch.set_rng_state(rng_state)
    reference = autograd_gradients(module, x, dout)
    tensors = {"input": x, **{name: p.detach() for name, p in module.named_parameters()}}

    def f() -> float:
        torch.set_rng_state(rng_state)
        with torch.no_grad():
            return float((module(x) * dout).sum())

    fd = finite_difference_errors(f, tensors, manual, points, generator)
    autograd_abs, autograd_rel = _worst_errors(manual, reference)
    return LayerCheck(f"{layer.path} {type(layer).__name__}", tuple(manual), autograd_abs, autograd_rel, *fd)


def check_loss(z: torch.Tensor, labels: torch.Tensor, points: int, generator: torch.Generator) -> LayerCheck:
    """The softmax cross-entropy (with label smoothing) at logits z: (N, K), labels: (N,)."""
    z = z.detach().clone()
    loss = SoftmaxCrossEntropy(LABEL_SMOOTHING)
    loss.forward(z, labels)
    manual = {"logits": loss.backward()}
    z_leaf = z.clone().requires_grad_()
    (reference,) = torch.autograd.grad(F.cross_entropy(z_leaf, labels, label_smoothing=LABEL_SMOOTHING), [z_leaf])

    def f() -> float:
        return float(F.cross_entropy(z, labels, label_smoothing=LABEL_SMOOTHING))

    fd = finite_difference_errors(f, {"logits": z}, manual, points, generator)
    return LayerCheck("loss SoftmaxCrossEntropy", ("logits",), *_worst_errors(manual, {"logits": reference}), *fd)


def hand_written_gradients(layer: Layer, x: torch.Tensor, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"input": dx, "weight": dw, ...}: the layer's forward then backward; names relative to the layer."""
    layer.forward(x)
    grads = {"input": layer.backward(dout)}
    prefix = f"{layer.path}." if layer.path else ""
    grads.update({name.removeprefix(prefix): g for name, g in layer.gradients().items()})
    return grads


def autograd_gradients(module: nn.Module, x: torch.Tensor, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same gradients from torch.autograd: {"input": dx, "weight": dw, ...}."""
    x = x.detach().clone().requires_grad_()
    named = dict(module.named_parameters())
    with torch.enable_grad():
        grads = torch.autograd.grad(module(x), [x, *named.values()], dout)
    return dict(zip(["input", *named], grads))


def finite_difference_errors(
    f, tensors: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], points: int, generator: torch.Generator
) -> tuple[float, float, int, int]:
    """Worst (abs, rel) error of `grads` against central differences of `f` at `points` random
    coordinates of each tensor (changed in place and restored), and how many points were
    compared and skipped as kinks."""
    worst_abs = worst_rel = 0.0
    compared = skipped = 0
    f0 = f()
    rounding = ROUNDING_ULPS * torch.finfo(torch.float64).eps * abs(f0) / (2 * STEP)
    floor = max(SCALE_FLOOR, rounding / FINITE_DIFFERENCE_TOLERANCE)
    for name, t in tensors.items():
        if grads.get(name) is None or grads[name].shape != t.shape:
            return float("inf"), float("inf"), compared, skipped
        flat, g = t.view(-1), grads[name].reshape(-1)
        kink_threshold = KINK_SLOPE_JUMP * max(float(g.abs().max()), SCALE_FLOOR)
        estimates, hand_written = [], []
        for i in torch.randperm(flat.numel(), generator=generator)[:points].tolist():
            original = float(flat[i])
            values = {}
            for step in (STEP, -STEP, KINK_PROBE, -KINK_PROBE, KINK_PROBE / 10, -KINK_PROBE / 10):
                flat[i] = original + step
                values[step] = f()
            flat[i] = original
            if _near_kink(values, f0, kink_threshold):
                skipped += 1
                continue
            estimates.append((values[STEP] - values[-STEP]) / (2 * STEP))
            hand_written.append(float(g[i]))
        if estimates:
            a, b = torch.tensor(hand_written), torch.tensor(estimates)
            error_abs, error_rel = _errors(a, b, floor)
            worst_abs, worst_rel = max(worst_abs, error_abs), max(worst_rel, error_rel)
            compared += len(estimates)
    return worst_abs, worst_rel, compared, skipped


def _near_kink(values: dict[float, float], f0: float, threshold: float) -> bool:
    """Whether f, sampled at t + step for the probe steps (`values`) and at t (`f0`), has a
    slope jump close enough to t to spoil a central difference.

    With a jump J at distance d < H, the second difference over H is J * (H - d) / H; on
    smooth ground it is H * f''. Only smooth ground (or a jump farther than ~0.09 H, where
    a STEP-wide difference is still exact) makes it shrink tenfold from H to H / 10.
    """

    def spread(h: float) -> float:
        return abs(values[h] - 2 * f0 + values[-h]) / h

    wide, narrow = spread(KINK_PROBE), spread(KINK_PROBE / 10)
    return wide > threshold and not 0.5 * wide <= 10 * narrow <= 1.5 * wide


def _worst_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    errors = [_errors(grads.get(name), reference[name]) for name in reference]
    return max(e[0] for e in errors), max(e[1] for e in errors)


def _errors(a: torch.Tensor | None, b: torch.Tensor, floor: float = SCALE_FLOOR) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(max |a|, max |b|, floor)); a missing gradient is infinitely wrong."""
    if a is None or a.shape != b.shape:
        return float("inf"), float("inf")
    if not a.numel():
        return 0.0, 0.0
    error = float((a - b).abs().max())
    return error, error / max(float(a.abs().max()), float(b.abs().max()), floor)
