"""`make bench` still runs: `bench/run.py --quick` on the built-in digits, its result file checked.

The figures of a quick run mean nothing (a few seconds of training on a small
dataset); real figures come from `make bench`. What is checked is the shape:
every contender present, with positive speeds and accuracies that are
accuracies, so that the bench cannot rot unnoticed. The other scripts'
quick modes: test_scripts.py.
"""

import json
import statistics
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
        assert "error" not in contender, contender
        assert contender["images_per_s"] > 0 and contender["gflops"] > 0
        assert 0 <= contender["final_test_accuracy"] <= 1
        runs = contender["runs"]  # one round (--quick), from seed 0
        assert [run["seed"] for run in runs] == [0]
        for run in runs:
            assert run["epochs"] and all(0 <= e["test_accuracy"] <= 1 for e in run["epochs"])
        assert contender["images_per_s"] == statistics.median_low(run["images_per_s"] for run in runs)
        assert contender["peak_rss_mb"] > 0
    # A round's images/s are medians over the epochs all its contenders ran, the first left out when
    # there are more (the seed recipe's budget may stop it within its first epoch).
    runs = [run for c in results["contenders"].values() for run in c["runs"]]
    common = min(len(run["epochs"]) for run in runs)
    assert all(run["steady_epochs"] == [min(2, common), common] for run in runs)
    # The contenders of a round ran at once but trained in turns: one turn per epoch, and no two
    # turns overlap.
    turns = []
    for key in CONTENDERS:
        run = results["contenders"][key]["runs"][0]
        assert len(run["turns"]) == len(run["epochs"]) + 1  # the last turn ends with the process
        turns += [(start, end, key) for start, end in run["turns"][:-1]]
    turns.sort()
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(turns, turns[1:])), turns
    assert {key for _, _, key in turns[:4]} == set(CONTENDERS)  # in rotation, from the start
    assert results["matmul"]["best_gflops"] > 0 and results["training_flops_per_image"] > 1e6
    for row in results["inference"]["forward"]:
        assert row["eager_images_per_s"] > 0 and row["cnnlab_images_per_s"] > 0
        assert row["max_abs_logit_difference"] < 1e-4
    assert results["machine"]["torch"] and results["date"] and "run.py" in results["command"]
    assert results["ratios"]["d/c"]["throughput"] > 0 and results["ratios"]["c/b"]["throughput"] > 0

    text = docs.read_text()
    assert "<!-- bench:begin" in text and "| (c) cnnlab train |" in text and "| (d) cnnlab --engine manual |" in text
    assert "| c/b |" in text and "| d/c |" in text
    assert "the median over the epochs every contender of the round ran, the first left out (" in text
    if Path("/proc/stat").exists():  # Linux: the hypervisor's share of the CPU time is read before and after
        assert 0 <= results["steal_share"] < 1 and "of the CPU time (steal)" in text


def test_images_per_s_are_taken_over_the_epochs_every_contender_of_the_round_ran(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from harness import steady_images_per_s
    from run import over_common_epochs

    def run(rates):
        epochs = [{"epoch": i + 1, "images_per_s": rate} for i, rate in enumerate(rates)]
        return {"images_per_s": steady_images_per_s(epochs), "epochs": epochs}

    plain = run([50, 100, 120, 110])
    cnnlab = run([60, 200, 220, 210, 20, 20, 20, 20])  # the host slowed down once the plain loop had finished
    failed = {"error": "plain_loop.py exited with status 2"}
    results = over_common_epochs({"plain_loop": plain, "cnnlab": cnnlab, "manual": failed})
    assert results["cnnlab"]["images_per_s_all_epochs"] == 20
    assert (results["cnnlab"]["images_per_s"], results["plain_loop"]["images_per_s"]) == (210, 110)
    assert results["cnnlab"]["steady_epochs"] == results["plain_loop"]["steady_epochs"] == [2, 4]
    assert results["manual"] == failed
    single = over_common_epochs({"plain_loop": run([70]), "cnnlab": run([90, 300])})
    assert (single["plain_loop"]["images_per_s"], single["cnnlab"]["images_per_s"]) == (70, 90)
    assert single["cnnlab"]["steady_epochs"] == [1, 1]


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


def test_a_contender_that_fails_leaves_the_rotation_and_the_others_finish(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from harness import run_in_turns

    quick = ["--dataset", "digits", "--epochs", "2", "--budget", "30"]
    jobs = {
        "broken": ("plain_loop.py", ["--dataset", "digits", "--epochs", "two"], tmp_path / "broken.json"),
        "plain_loop": ("plain_loop.py", quick, tmp_path / "plain.json"),
        "seed_recipe": ("seed_recipe.py", [*quick, "--train-limit", "200"], tmp_path / "seed.json"),
    }
    results = run_in_turns(jobs)
    assert results["broken"] == {"error": "plain_loop.py exited with status 2"}
    assert [e["epoch"] for e in results["plain_loop"]["epochs"]] == [1, 2]
    assert [e["epoch"] for e in results["seed_recipe"]["epochs"]] == [1, 2]
    # The two that ran alternated: plain, seed, plain, seed.
    starts = sorted((turn[0], key) for key in ("plain_loop", "seed_recipe") for turn in results[key]["turns"][:2])
    assert [key for _, key in starts] == ["plain_loop", "seed_recipe", "plain_loop", "seed_recipe"]


def test_figures_over_rounds_are_medians_and_a_target_not_reached_counts_as_slowest(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from run import median_ratios, medians

    def run(rate, to_target, accuracy):
        return {"description": "d", "batch_size": 8, "images_per_s": rate, "time_to_target_s": to_target,
                "epochs_to_target": None if to_target is None else 3, "final_test_accuracy": accuracy,
                "stopped_by_budget": False, "peak_rss_mb": rate / 10}  # fmt: skip

    summary = medians([run(100, 9.0, 0.91), run(300, None, 0.89), run(200, 7.0, 0.90)])
    assert (summary["images_per_s"], summary["time_to_target_s"], summary["final_test_accuracy"]) == (200, 9.0, 0.90)
    assert summary["peak_rss_mb"] == 30 and len(summary["runs"]) == 3
    assert medians([run(100, None, 0.8), run(100, None, 0.8), run(1, 5.0, 0.9)])["time_to_target_s"] is None

    rounds = [{"c/b": {"throughput": t, "time_to_target_speedup": s}} for t, s in ((1.2, None), (1.6, 1.5), (1.4, 1.7))]
    merged = median_ratios(rounds)["c/b"]
    assert merged["throughput"] == 1.4 and merged["time_to_target_speedup"] == 1.6
    assert merged["throughput_each_round"] == [1.2, 1.6, 1.4]


def test_steal_is_read_from_proc_stat_and_taken_as_a_share_of_all_cpu_time(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import run

    before = "cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n"
    after = "cpu  400 0 150 1200 10 0 5 235 7 0\n"  # 1,000 more ticks, 200 of them stolen
    assert run.cpu_times(before) == (35, 1000)
    assert run.cpu_times(after) == (235, 2000)
    assert run.steal_share(run.cpu_times(before), run.cpu_times(after)) == 0.2
    assert run.cpu_times("intr 1 2 3\n") is None and run.steal_share(None, (1, 2)) is None
    assert run.steal_share((5, 100), (5, 100)) is None  # no time passed
