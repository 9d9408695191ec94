"""The bench still runs: `bench/run.py --quick` on the built-in digits, its result file checked.

The figures of a quick run mean nothing (a few seconds of training on a small
dataset); real figures come from `make bench`. What is checked is the shape:
every contender present, with positive speeds and accuracies that are
accuracies, so that the bench cannot rot unnoticed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTENDERS = ("seed_recipe", "plain_loop", "cnnlab", "manual")

pytestmark = pytest.mark.timeout(300)


def test_a_quick_bench_reports_every_contender_and_inference(tmp_path):
    out, docs = tmp_path / "bench.json", tmp_path / "performance.md"
    command = [sys.executable, "bench/run.py", "--quick", "--dataset", "digits", "--out", str(out), "--docs", str(docs)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]

    results = json.loads(out.read_text())
    assert set(results["contenders"]) == set(CONTENDERS)
    for key in CONTENDERS:
        contender = results["contenders"][key]
        if key == "manual" and "skipped" in contender:
            continue
        assert "error" not in contender, contender
        assert contender["images_per_s"] > 0 and contender["gflops"] > 0
        assert 0 <= contender["final_test_accuracy"] <= 1
        assert contender["epochs"] and all(0 <= e["test_accuracy"] <= 1 for e in contender["epochs"])
        assert contender["peak_rss_mb"] > 0
    assert results["matmul"]["best_gflops"] > 0 and results["training_flops_per_image"] > 1e6
    steps = results["side_by_side"]
    assert steps["images_per_s"]["b"] > 0 and steps["images_per_s"]["c"] > 0
    assert steps["c_over_b_range"][0] <= steps["c_over_b"] <= steps["c_over_b_range"][1]
    for row in results["inference"]["forward"]:
        assert row["eager_images_per_s"] > 0 and row["cnnlab_images_per_s"] > 0
        assert row["max_abs_logit_difference"] < 1e-4
    assert results["machine"]["torch"] and results["date"] and "run.py" in results["command"]

    text = docs.read_text()
    assert "<!-- bench:begin" in text and "| (c) cnnlab train |" in text and "side_by_side.py" in text


def test_a_time_to_target_that_only_one_side_reached_is_a_bound_or_said_as_such(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from run import time_to_target_speedup

    assert time_to_target_speedup({"time_to_target_speedup": 1.52}, "90%") == "x1.52"
    assert time_to_target_speedup({"time_to_target_speedup": None}, "90%") == "-"
    bound = {"time_to_target_speedup": None, "time_to_target_speedup_at_least": 17.78}
    assert time_to_target_speedup(bound, "90%") == "more than x17.78 (the other never reached it)"
    # The other stopped short of the target sooner than the first reached it: that bounds nothing.
    short = {"time_to_target_speedup": None, "time_to_target_speedup_at_least": 0.5}
    assert "more than" not in time_to_target_speedup(short, "90%")
    assert time_to_target_speedup(short, "90%").startswith("only the first reached it")
