"""report.html in a real browser (Debian's chromium through Playwright): it loads with no console error,
every image decodes, and its tables hold the run's own numbers; `cnnlab report` and its errors; a report
that cannot be written leaves the run whole."""

from __future__ import annotations

import json
import shutil

from PIL import Image

from cnnlab.cli import main
from cnnlab.models import count_parameters, create_model
from cnnlab.train.diagnostics import read_diagnostics

TABLE = "sel => [...document.querySelectorAll(sel + ' tr')].map(r => [...r.children].map(c => c.textContent))"


def test_the_report_train_writes_loads_cleanly_and_holds_the_runs_numbers(trained_run, chromium):
    path = trained_run / "report.html"
    assert 0 < path.stat().st_size < 3 * 2**20
    page = chromium.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: None if request.url.startswith(("file:", "data:")) else problems.append(request.url))
    page.goto(path.as_uri(), wait_until="load")
    images = page.evaluate("() => [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])")
    tables = {name: page.evaluate(TABLE, f"table.{name}") for name in ("per-class", "confusion", "layers", "gradients", "config")}
    page.close()
    assert problems == []  # no console error, no failed script, nothing fetched from anywhere

    summary = json.loads((trained_run / "summary.json").read_text())
    mistakes = min(16, sum(row[j] for i, row in enumerate(summary["test"]["confusion_matrix"]) for j in range(10) if i != j))
    # curves, the mistakes, the filters, 3 test images x (input, 2 convolutions, saliency, Grad-CAM), gradient chart
    assert len(images) == 1 + mistakes + 1 + 3 * 5 + 1
    assert all(complete and width > 0 for _, complete, width in images), images

    per_class = summary["test"]["per_class"]
    assert tables["per-class"][1:] == [
        [c["name"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"])] for c in per_class
    ]
    assert [[int(v) for v in row[1:]] for row in tables["confusion"][1:]] == summary["test"]["confusion_matrix"]
    assert tables["layers"][-1][:5] == ["total", "", "", f"{count_parameters(create_model('lenet5', (1, 28, 28), 10)):,}",
                                        "281,640"]  # fmt: skip
    last = read_diagnostics(trained_run)[-1]
    assert [row[:2] for row in tables["gradients"][1:]] == [[k, f"{v['grad_norm']:.4g}"] for k, v in last["layers"].items()]
    config = dict(row for row in tables["config"][1:])
    assert (config["model"], config["epochs"], config["batch_size"]) == ("lenet5", "3", "32")


def test_report_writes_where_asked(trained_run, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(trained_run), "--out", str(out)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "lenet5 on digits" in page and "$" not in page.replace("$(", "")


def test_images_inspected_before_show_in_the_report(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    image = tmp_path / "shoe.png"
    Image.new("L", (28, 28), color=200).save(image)
    assert main(["inspect", str(run), "--image", str(image)]) == 0  # into RUN/inspect/shoe/
    assert main(["report", str(run)]) == 0
    section = (run / "report.html").read_text().split('id="inspected"')[1].split("<h2")[0]
    alts = [alt.split('"')[0] for alt in section.split('alt="')[1:]]
    assert alts == [f"{name} of shoe" for name in
                    ("input.png", "features-0.png", "features-3.png", "saliency.png", "gradcam.png")]  # fmt: skip


def test_a_run_without_a_checkpoint_or_a_test_is_one_line_and_exit_2(trained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoints/best.pt" in err and err.count("\n") == 1
    untested = tmp_path / "untested"
    shutil.copytree(trained_run, untested)
    (untested / "summary.json").unlink()
    assert main(["report", str(untested)]) == 2
    err = capsys.readouterr().err
    assert "has no summary.json: the run was not tested yet" in err and err.count("\n") == 1


def test_a_report_that_cannot_be_written_leaves_the_run_whole(tmp_path, monkeypatch, capsys):
    import cnnlab.tools.report

    def fail(run_dir, out=None):
        raise RuntimeError("no room for pictures")

    monkeypatch.setattr(cnnlab.tools.report, "write_report", fail)
    args = ["train", "--epochs", "1", "--batch-size", "128", "--runs-dir", str(tmp_path), "--name", "r", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["run_dir"] == str(tmp_path / "r")
    assert "the run is saved, but its report.html was not written (no room for pictures)" in captured.err
    assert (tmp_path / "r" / "summary.json").is_file() and not (tmp_path / "r" / "report.html").exists()
    assert [e["epoch"] for e in read_diagnostics(tmp_path / "r")] == [1]
