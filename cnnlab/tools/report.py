"""A run's report: one self-contained HTML page (report.html) of its results and of what its model learned.

`write_report(run_dir)` reads the run directory (config.yaml, summary.json, curves.png,
diagnostics.json, the best checkpoint) and the run's test split, and
fills report.html next to this module: config, curves, the per-class table, the
confusion matrix, the most confident mistakes, the first layer's filters, feature
maps with saliency and Grad-CAM for a few test images, the pictures `cnnlab inspect
RUN --image` left in RUN/inspect/, the gradient-flow chart and the layer table. Every image is a PNG embedded as a data: URL and the page has no
script, so it opens anywhere, offline, as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from string import Template

import torch
import yaml

from cnnlab.atomicfile import atomic_write_text
from cnnlab.data.dataset import ImageDataset
from cnnlab.data.sources import get_source
from cnnlab.errors import CnnlabError
from cnnlab.fast.forward import fast_forward
from cnnlab.tools.attribution import (
    FEATURE_MAP_SIZE,
    as_picture,
    conv_layers,
    explain,
    heatmap,
    picture_scale,
    png_bytes,
    tile,
)
from cnnlab.tools.inspect import layer_table, receptive_field_text
from cnnlab.tools.predict import top_predictions
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path
from cnnlab.train.diagnostics import read_diagnostics

TEMPLATE = Path(__file__).with_name("report.html")
MISTAKES = 16  # images in the grid of confident mistakes
EXAMPLES = 3  # test images whose feature maps are shown


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of the run in `run_dir` to `out` (default RUN/report.html); its path."""
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_text(path, build_report(Path(run_dir)))
    return path


def build_report(run_dir: Path) -> str:
    """The report page of the run in `run_dir`, as HTML text."""
    checkpoint = load_checkpoint(resolve_checkpoint_path(run_dir))
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CnnlabError(
            f"{run_dir} has no summary.json: the run was not tested yet; finish it with `cnnlab train --resume {run_dir}`"
        )
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise CnnlabError(f"cannot read {summary_path} ({exc}): test the run again with `cnnlab evaluate`") from None
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    model = checkpoint.build_model()
    test = _test_split(checkpoint, config)
    probabilities = _probabilities(model, test, checkpoint)  # (N, K)
    name = run_dir.resolve().name
    accuracy = 100 * summary["test_accuracy"]
    sections = {
        "title": html.escape(f"{name}: {checkpoint.model['name']} on {checkpoint.dataset}"),
        "lead": html.escape(
            f"test accuracy {accuracy:.2f}%, loss {summary['test_loss']:.4f}, best epoch {summary['best_epoch']} "
            f"of {summary['epochs']}; cnnlab {summary['versions']['cnnlab']}, torch {summary['versions']['torch']}"
        ),
        "config": _config_table(config),
        "curves": _file_image(run_dir / "curves.png", "loss and accuracy per epoch"),
        "per_class": _per_class_table(summary["test"]["per_class"]),
        "confusion": _confusion_table(summary["test"]["confusion_matrix"], checkpoint.classes),
        "mistakes": _mistakes(test, probabilities, checkpoint.classes),
        "filters": _filters(model),
        "examples": _examples(model, test, checkpoint),
        "inspected": _inspected(run_dir / "inspect"),
        "gradient_flow": _gradient_flow(read_diagnostics(run_dir)),
        "layers": _layer_table(model, checkpoint.in_shape),
    }
    return Template(TEMPLATE.read_text()).substitute(sections)


def _test_split(checkpoint: Checkpoint, config: dict) -> ImageDataset:
    """The test split of the dataset the run was trained on, from where training found it."""
    data_dir = config.get("data_dir")
    _, test = get_source(checkpoint.dataset).load(Path(data_dir) if data_dir else None)
    if test.image_shape != checkpoint.in_shape or test.classes != checkpoint.classes:
        raise CnnlabError(f"the dataset '{checkpoint.dataset}' found now is not the one the run was trained on")
    return test


@torch.inference_mode()
def _probabilities(model: torch.nn.Module, test: ImageDataset, checkpoint: Checkpoint) -> torch.Tensor:
    """(N, K) softmax of the model over the test images."""
    forward = fast_forward(model)
    return torch.cat([forward(checkpoint.normalization.apply(batch)).softmax(dim=1) for batch in test.images.split(512)])


def _image(png: bytes, alt: str, css_class: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    extra = f' class="{css_class}"' if css_class else ""
    return f'<img{extra} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _file_image(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="note">{html.escape(path.name)} is missing from the run.</p>'
    return _image(path.read_bytes(), alt, "chart")


def _table(header: list[str], rows: list[list[str]], css_class: str, names: int = 1) -> str:
    """An HTML table; cells are escaped here; the first `names` columns are text (left-aligned)."""

    def cells(tag: str, row: list[str]) -> str:
        return "".join(
            f'<{tag}{" class=name" if i < names else ""}>{html.escape(str(v))}</{tag}>' for i, v in enumerate(row)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{cells("th", header)}</tr></thead><tbody>{body}</tbody></table>'


def _config_table(config: dict) -> str:
    def flat(prefix: str, value: object) -> list[list[str]]:
        if isinstance(value, dict):
            return [row for key, v in value.items() for row in flat(f"{prefix}.{key}" if prefix else key, v)]
        return [[prefix, "" if value is None else str(value)]]

    return _table(["option", "value"], flat("", config), "config", names=2)


def _per_class_table(per_class: list[dict]) -> str:
    rows = [[c["name"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"])] for c in per_class]
    return _table(["class", "precision", "recall", "f1", "support"], rows, "per-class")


def _confusion_table(confusion: list[list[int]], classes: tuple[str, ...]) -> str:
    """Counts, each cell shaded by its share of its row (the true class)."""
    header = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    body = []
    for name, row in zip(classes, confusion):
        total = max(sum(row), 1)
        cells = "".join(f'<td style="background:rgba(31,119,180,{v / total:.2f})">{v}</td>' for v in row)
        body.append(f"<tr><th class=name>{html.escape(name)}</th>{cells}</tr>")
    return f'<table class="confusion"><thead><tr><th class=name>true \\ predicted</th>{header}</tr></thead>' \
           f'<tbody>{"".join(body)}</tbody></table>'  # fmt: skip


def _mistakes(test: ImageDataset, probabilities: torch.Tensor, classes: tuple[str, ...]) -> str:
    confidence, predicted = probabilities.max(dim=1)  # (N,), (N,)
    wrong = torch.nonzero(predicted != test.labels).flatten()
    if len(wrong) == 0:
        return '<p class="note">No test image is misclassified.</p>'
    worst = wrong[confidence[wrong].argsort(descending=True)[:MISTAKES]]
    scale = picture_scale(test.image_shape[1])
    figures = []
    for i in worst.tolist():
        truth, guess = classes[int(test.labels[i])], classes[int(predicted[i])]
        caption = f"#{i}: {guess} {100 * confidence[i].item():.1f}%, truly {truth}"
        figures.append(f"<figure>{_image(png_bytes(as_picture(test.images[i]), scale), caption)}"
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    return f'<div class="grid mistakes">{"".join(figures)}</div>'


def _filters(model: torch.nn.Module) -> str:
    name = conv_layers(model)[0] if conv_layers(model) else None
    if name is None:
        return '<p class="note">The model has no convolution.</p>'
    weight = dict(model.named_modules())[name].weight.detach()  # (out, in, kh, kw)
    grid = tile(weight.mean(dim=1))  # each filter averaged over its input channels
    caption = f"layer {name}: {weight.shape[0]} filters of {weight.shape[2]}x{weight.shape[3]}" + (
        f", averaged over {weight.shape[1]} input channels" if weight.shape[1] > 1 else ""
    )
    picture = _image(png_bytes(grid, max(1, 96 // weight.shape[2])), caption)
    return f"<figure>{picture}<figcaption>{html.escape(caption)} (light: positive weights)</figcaption></figure>"


def _examples(model: torch.nn.Module, test: ImageDataset, checkpoint: Checkpoint) -> str:
    if not conv_layers(model):
        return '<p class="note">The model has no convolution.</p>'
    blocks = []
    scale = picture_scale(test.image_shape[1])
    for i in range(min(EXAMPLES, len(test))):
        image = test.images[i]  # (C, H, W) uint8
        explanation = explain(model, checkpoint.normalization.apply(image[None]))
        (top,) = top_predictions(explanation.probabilities[None], checkpoint.classes, 3)
        ranked = ", ".join(f"{c} {100 * p:.1f}%" for c, p in zip(top.classes, top.probabilities))
        pictures = [
            ("input", png_bytes(as_picture(image), scale)),
            *((f"conv {name}", png_bytes(tile(maps), picture_scale(maps.shape[1], FEATURE_MAP_SIZE)))
              for name, maps in explanation.feature_maps.items()),
            ("saliency", png_bytes(heatmap(explanation.saliency), scale)),
            (f"Grad-CAM (layer {explanation.gradcam_layer})", png_bytes(heatmap(explanation.gradcam, image), scale)),
        ]  # fmt: skip
        figures = "".join(
            f"<figure>{_image(png, f'{label} of test image #{i}')}<figcaption>{html.escape(label)}</figcaption></figure>"
            for label, png in pictures
        )
        title = f"test image #{i}, truly {checkpoint.classes[int(test.labels[i])]}: {ranked}"
        blocks.append(f'<figure class="example"><figcaption>{html.escape(title)}</figcaption>'
                      f'<div class="maps">{figures}</div></figure>')  # fmt: skip
    return "".join(blocks)


def _inspected(folder: Path) -> str:
    """The pictures `cnnlab inspect RUN --image FILE` left in RUN/inspect/, one row per image."""
    images = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not images:
        return '<p class="note">None yet: <code>cnnlab inspect RUN --image FILE</code> adds its pictures here.</p>'
    blocks = []
    for image in images:
        order = ["input.png", *sorted(p.name for p in image.glob("features-*.png")), "saliency.png", "gradcam.png"]
        figures = "".join(
            f"<figure>{_image((image / name).read_bytes(), f'{name} of {image.name}')}"
            f"<figcaption>{html.escape(name.removesuffix('.png'))}</figcaption></figure>"
            for name in order
            if (image / name).is_file()
        )
        blocks.append(f'<figure class="example"><figcaption>{html.escape(image.name)}</figcaption>'
                      f'<div class="maps">{figures}</div></figure>')  # fmt: skip
    return "".join(blocks)


def _gradient_flow(epochs: list[dict]) -> str:
    """Per layer and epoch: gradient norm and update-to-weight ratio (chart), and the last epoch's table."""
    if not epochs:
        return '<p class="note">This run has no diagnostics.json.</p>'
    last = epochs[-1]
    layer_rows = [[name, f"{v['grad_norm']:.4g}", f"{v['update_ratio']:.3g}", f"{v['weight_norm']:.4g}"]
                  for name, v in last["layers"].items()]  # fmt: skip
    activation_rows = [
        [name, f"{v['mean']:.4g}", f"{v['std']:.4g}", f"{100 * v['dead_fraction']:.1f}%" if "dead_fraction" in v else ""]
        for name, v in last["activations"].items()
    ]
    note = (f'<p class="note">Measured on the first batch of each epoch ({last["batch"]} images), from the '
            f'{html.escape(last["engine"])} engine\'s gradients before clipping. Tables: epoch {last["epoch"]}.</p>')  # fmt: skip
    return (
        _image(_gradient_chart(epochs), "gradient norm and update-to-weight ratio per layer and epoch", "chart")
        + note
        + _table(["layer", "gradient norm", "update / weight", "weight norm"], layer_rows, "gradients")
        + _table(["activation", "mean", "std", "dead units"], activation_rows, "activations")
    )


def _gradient_chart(epochs: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(epochs[-1]["layers"])
    fig, (ax_grad, ax_ratio) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = plt.get_cmap("viridis")
    for i, epoch in enumerate(epochs):
        colour = colours(i / max(len(epochs) - 1, 1))
        figures = [epoch["layers"].get(layer) for layer in layers]
        label = f"epoch {epoch['epoch']}" if i in (0, len(epochs) - 1) else None
        ax_grad.plot(layers, [f["grad_norm"] if f else float("nan") for f in figures], marker="o", color=colour, label=label)
        ax_ratio.plot(layers, [f["update_ratio"] if f else float("nan") for f in figures], marker="o", color=colour)
    ax_grad.set(yscale="log", xlabel="layer", ylabel="gradient norm", title="Gradient norm per layer")
    ax_ratio.set(yscale="log", xlabel="layer", ylabel="||update|| / ||weights||", title="Update-to-weight ratio")
    for ax in (ax_grad, ax_ratio):
        ax.grid(alpha=0.3)
    ax_grad.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def _layer_table(model: torch.nn.Module, in_shape: tuple[int, int, int]) -> str:
    table = layer_table(model, in_shape)
    rows = [[r.name, r.type, "x".join(map(str, r.output_shape)), f"{r.parameters:,}", f"{r.mult_adds:,}",
             receptive_field_text(r.receptive_field)] for r in table.rows]  # fmt: skip
    rows.append(["total", "", "", f"{table.total_parameters:,}", f"{table.total_mult_adds:,}", ""])
    header = ["layer", "type", "output", "parameters", "mult-adds", "receptive field"]
    return _table(header, rows, "layers", names=2)
