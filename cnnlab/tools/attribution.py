"""What a trained model sees in one image: the feature maps of its convolutions, a saliency map and Grad-CAM.

`explain(model, x)` runs one forward and one backward pass through the plain
module (hooks do not fire on the fast path, and gradients are wanted here):

- feature maps: every Conv2d's output for the image, in the order they run;
- saliency (Simonyan et al., 2014): |d logit[c] / d x|, the largest over the
  channels, for the class c explained: which pixels would move the score most;
- Grad-CAM (Selvaraju et al., 2017) on one convolution (the last by default):
  its maps A_k weighted by the mean gradient of logit[c] over each map,
  relu(sum_k alpha_k A_k), upsampled to the image: where the evidence for c lies.

The rest turns these into pictures (uint8 arrays and PNG bytes) for `cnnlab inspect`
and the run report.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnlab.atomicfile import atomic_write_bytes
from cnnlab.errors import CnnlabError

FEATURE_MAP_SIZE = 56  # screen pixels a feature map is drawn at, about: many maps sit side by side


@dataclass(frozen=True)
class Explanation:
    """One image's explanation. H x W is the model's input size."""

    feature_maps: dict[str, torch.Tensor]  # conv name -> (C', h, w) float32, every convolution in running order
    probabilities: torch.Tensor  # (K,) float32, softmax of the logits
    target: int  # the class explained
    saliency: torch.Tensor  # (H, W) float32, >= 0
    gradcam: torch.Tensor  # (H, W) float32 in [0, 1]
    gradcam_layer: str


def conv_layers(model: nn.Module) -> list[str]:
    """The names of `model`'s convolutions ("0", "4.body.3"), in definition order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def check_layer(model: nn.Module, layer: str | None) -> str:
    """`layer`, or the last convolution when None; a CnnlabError unless it is one of the model's convolutions."""
    convs = conv_layers(model)
    if not convs:
        raise CnnlabError("the model has no convolution: Grad-CAM and feature maps need one")
    if layer is None:
        return convs[-1]
    if layer not in convs:
        raise CnnlabError(
            f"unknown layer '{layer}': --layer takes one of the model's convolutions, {', '.join(convs)} "
            "(`cnnlab inspect RUN` lists every layer)"
        )
    return layer


def explain(model: nn.Module, x: torch.Tensor, *, layer: str | None = None, target: int | None = None) -> Explanation:
    """x: (1, C, H, W) float32, normalized as in training. layer: the convolution for Grad-CAM (default the
    last); target: the class to explain (default the most probable).

    The model's mode and its parameters' .grad are left as they were.
    """
    layer = check_layer(model, layer)
    modules = dict(model.named_modules())
    maps: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(lambda module, args, out, name=name: maps.__setitem__(name, out))
        for name in conv_layers(model)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            logits = model(x)  # (1, K)
            target = int(logits.argmax(dim=1)) if target is None else target
            # autograd.grad, not backward(): the model's .grad fields are not touched.
            dx, dmaps = torch.autograd.grad(logits[0, target], [x, maps[layer]])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    activations, alpha = maps[layer][0].detach(), dmaps[0].mean(dim=(1, 2))  # (C', h, w), (C',)
    cam = torch.relu((alpha[:, None, None] * activations).sum(dim=0))  # (h, w)
    cam = F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return Explanation(
        feature_maps={name: out[0].detach() for name, out in maps.items()},
        probabilities=logits.detach().softmax(dim=1)[0],
        target=target,
        saliency=dx[0].abs().amax(dim=0),
        gradcam=cam / peak if peak > 0 else cam,
        gradcam_layer=layer,
    )


def tile(maps: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """(C, h, w) float -> one (rows*(h+1)-1, columns*(w+1)-1) uint8 grid, each map scaled to 0..255 on its own."""
    count, h, w = maps.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    scaled = ((maps - low) / span * 255).round().to(torch.uint8).numpy()
    grid = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1), 255, dtype=np.uint8)  # white lines between maps
    for i in range(count):
        r, c = divmod(i, columns)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = scaled[i]
    return grid


def as_picture(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 with C = 1 or 3 -> (H, W) or (H, W, 3) uint8, as PIL takes it."""
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def heatmap(values: torch.Tensor, image: torch.Tensor | None = None) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 in the 'inferno' colours, scaled to its maximum; blended
    half and half with `image` ((C, H, W) uint8) when given, to show where on it the heat lies."""
    from matplotlib import colormaps

    scaled = (values / values.max().clamp_min(1e-12)).clamp(0, 1).numpy()
    colours = colormaps["inferno"](scaled)[..., :3] * 255  # (H, W, 3) float
    if image is not None:
        grey = image.float().mean(dim=0).numpy()[..., None]  # (H, W, 1)
        colours = 0.5 * colours + 0.5 * grey
    return colours.round().astype(np.uint8)


def png_bytes(pixels: np.ndarray, scale: int = 1) -> bytes:
    """(H, W) or (H, W, 3) uint8 -> a PNG, each pixel a scale x scale block (sharp, and small once compressed)."""
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def picture_scale(height: int, target: int = 112) -> int:
    """How many screen pixels per image pixel make an H-high image about `target` high (28x28 images: 4)."""
    return max(1, round(target / height))


def write_explanation(explanation: Explanation, image: torch.Tensor, folder: Path) -> list[Path]:
    """PNGs of `explanation` for the image (C, H, W) uint8 as the model sees it, in `folder`; their paths.

    input.png, saliency.png, gradcam.png (over the image) and features-<layer>.png for each convolution.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scale = picture_scale(image.shape[1])
    pictures = {
        "input.png": png_bytes(as_picture(image), scale),
        "saliency.png": png_bytes(heatmap(explanation.saliency), scale),
        "gradcam.png": png_bytes(heatmap(explanation.gradcam, image), scale),
        **{f"features-{name}.png": png_bytes(tile(maps), picture_scale(maps.shape[1], FEATURE_MAP_SIZE))
           for name, maps in explanation.feature_maps.items()},
    }  # fmt: skip
    for name, data in pictures.items():
        atomic_write_bytes(folder / name, data)
    return [folder / name for name in pictures]
