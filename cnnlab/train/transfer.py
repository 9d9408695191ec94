"""Transfer learning: a new run that starts from a trained model's weights (`--init-from`, `--freeze`).

    cnnlab train --dataset folder:few-digits --init-from runs/lenet5-fashion --freeze features --head-lr-mult 10

The weights come from a run directory (its best checkpoint), a checkpoint file,
or a `.safetensors` file written by `cnnlab export`; all three load without
running code (torch.load(weights_only=True), safetensors). They must be of the
model this run trains. What cannot carry over is adapted or refused:

- the head (the last Linear layer) is replaced by a freshly initialised one when
  the classes differ (another count, or other names: fashion-mnist's ten classes
  are not digits' ten), since its rows are the old classes' scores;
- the first convolution, trained on grey images, takes colour ones (or the other
  way round) by spreading its weights evenly over the new channels (or summing
  them), so that a grey image given as R = G = B gives the layer the same output;
- any other difference in shape (LeNet-5's first Linear layer after images of
  another size) is an error that says so.

Frozen layers keep their parameters and, for batch norm, their running statistics
(momentum 0) bit for bit; in training their batch norms still normalize each batch
by its own statistics, as every batch norm does. The run's config.yaml records
`init_from` and `freeze`; a resumed run takes its weights from its own checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab.config import TrainConfig
from cnnlab.errors import CnnlabError
from cnnlab.models.parts import feature_layers, head_layer, layers_with_weights
from cnnlab.train.checkpoint import load_checkpoint, resolve_checkpoint_path


def transfer(model: nn.Module, config: TrainConfig, classes: tuple[str, ...], *, resumed: bool) -> str | None:
    """Apply --init-from (to a new run: a resumed one has its own weights) and --freeze to `model`.

    model: a fresh config.model for `classes`. Returns the line that says where the weights
    came from, or None when they did not come from --init-from.
    """
    line = None
    if config.init_from is not None and not resumed:
        line = initialise_from(model, read_pretrained(config.init_from), model_name=config.model, classes=classes)
    if config.freeze is not None:
        freeze_layers(model, config.freeze, model_name=config.model)
    return line


@dataclass(frozen=True)
class Pretrained:
    """Weights to start from, and what they were trained as."""

    origin: str  # the path as given, for messages
    model_name: str
    in_shape: tuple[int, int, int]  # (C, H, W) of the images it was trained on
    classes: tuple[str, ...]
    dataset: str
    state: dict[str, torch.Tensor]


def read_pretrained(source: str) -> Pretrained:
    """The weights in `source`: a run directory, a checkpoint (.pt) or an exported .safetensors file."""
    if source.endswith(".safetensors"):
        return _read_safetensors(source)
    checkpoint = load_checkpoint(resolve_checkpoint_path(Path(source)))
    return Pretrained(source, checkpoint.model["name"], checkpoint.in_shape, checkpoint.classes, checkpoint.dataset,
                      checkpoint.model_state)  # fmt: skip


def _read_safetensors(source: str) -> Pretrained:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CnnlabError("reading .safetensors needs the export extra: pip install 'cnnlab[export]'") from None
    if not Path(source).is_file():
        raise CnnlabError(f"--init-from {source} does not exist: pass a run directory, a .pt or a .safetensors file")
    try:
        with safe_open(source, framework="pt") as file:
            metadata = file.metadata() or {}
            state = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CnnlabError(f"--init-from {source} is not a readable .safetensors file ({exc})") from None
    try:
        info = json.loads(metadata["cnnlab"])
        return Pretrained(source, str(info["name"]), tuple(int(v) for v in info["in_shape"]),
                          tuple(str(c) for c in info["classes"]), str(info["dataset"]), state)  # fmt: skip
    except (KeyError, TypeError, ValueError):
        raise CnnlabError(
            f"--init-from {source} does not say which model it holds (no cnnlab metadata): "
            "use a file written by `cnnlab export`, or the run directory"
        ) from None


def initialise_from(model: nn.Module, pretrained: Pretrained, *, model_name: str, classes: tuple[str, ...]) -> str:
    """Load `pretrained` into `model` (a fresh `model_name` for `classes`), adapting what must be.

    Returns one line saying where the weights came from and what was adapted.
    """
    origin = pretrained.origin
    if pretrained.model_name != model_name:
        raise CnnlabError(
            f"--init-from {origin} holds a {pretrained.model_name} and this run trains a {model_name}: "
            f"pass --model {pretrained.model_name}, or weights of a {model_name}"
        )
    target = model.state_dict()
    if set(target) != set(pretrained.state):
        raise CnnlabError(f"--init-from {origin}: its weights are not a {model_name}'s (other tensor names)")
    head = head_layer(model)
    replace_head = tuple(pretrained.classes) != tuple(classes)
    first_conv = next(key for key, value in target.items() if value.dim() == 4)
    loaded, notes = {}, []
    for key, value in pretrained.state.items():
        if replace_head and key.rpartition(".")[0] == head:
            continue  # the fresh head's initial weights stay
        if key == first_conv and value.shape != target[key].shape:
            value = _adapt_channels(value, target[key].shape[1], origin)
            notes.append(f"first convolution spread from {pretrained.in_shape[0]} to {target[key].shape[1]} channels")
        if value.shape != target[key].shape:
            raise CnnlabError(
                f"--init-from {origin}: its {key} has shape {tuple(value.shape)} and this model's "
                f"{tuple(target[key].shape)}: it was trained on {_shape(pretrained.in_shape)} images; "
                "give the dataset that size (folder:PATH,size=HxW) or train from scratch"
            )
        loaded[key] = value
    model.load_state_dict({**target, **loaded})
    if replace_head:
        notes.append(f"new head (layer {head}) for {len(classes)} classes")
    described = f"{model_name} trained on {pretrained.dataset}, {len(pretrained.classes)} classes"
    return f"weights from {origin} ({described}): {len(loaded)} of {len(target)} tensors" + "".join(
        f"; {note}" for note in notes
    )


def _adapt_channels(w: torch.Tensor, channels: int, origin: str) -> torch.Tensor:
    """A first convolution's weights w: (out, c, kh, kw) for `channels` input channels.

    1 -> C: each channel gets w / C; C -> 1: the channels' weights summed. Either way an
    image whose channels are all equal gives the same output as before.
    """
    if w.shape[1] == 1:
        return w.expand(-1, channels, -1, -1) / channels
    if channels == 1:
        return w.sum(dim=1, keepdim=True)
    raise CnnlabError(
        f"--init-from {origin} was trained on {w.shape[1]}-channel images and this dataset has {channels}: "
        "only grey to colour or colour to grey can be adapted; convert the images (folder:PATH,channels=N)"
    )


def _shape(in_shape: tuple[int, int, int]) -> str:
    channels, height, width = in_shape
    return f"{channels}x{height}x{width}"


def freeze_layers(model: nn.Module, targets: str, *, model_name: str) -> list[str]:
    """Keep the layers `targets` names ("features", layer names; comma-separated) as they are.

    Their parameters stop requiring gradients, so neither engine updates them, and their
    batch norms keep their running statistics. Returns the frozen parameters' names.
    """
    known = layers_with_weights(model)
    layers: list[str] = []
    for target in (t.strip() for t in targets.split(",")):
        if target == "features":
            layers += feature_layers(model)
        elif target in known:
            layers.append(target)
        else:
            raise CnnlabError(
                f"--freeze {target}: {model_name} has no layer '{target}' with weights; "
                f"choose features or among {', '.join(known)}"
            )
    frozen = []
    for name in dict.fromkeys(layers):
        layer = model.get_submodule(name)
        for param_name, param in layer.named_parameters():
            param.requires_grad_(False)
            frozen.append(f"{name}.{param_name}")
        for module in layer.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0  # running statistics: (1 - 0) * old + 0 * new, exactly the old
    if not any(p.requires_grad for p in model.parameters()):
        raise CnnlabError(f"--freeze {targets} leaves {model_name} nothing to train: freeze fewer layers")
    return frozen
