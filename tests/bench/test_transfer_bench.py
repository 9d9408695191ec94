"""bench/transfer.py --quick runs for real: pretrains, fine-tunes four ways, and writes its table and results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_transfer_pretrains_then_compares_scratch_fine_tuned_and_frozen_runs(tmp_path):
    docs = tmp_path / "transfer.md"
    docs.write_text("# Transfer learning\n\nHand-written prose.\n")
    command = [sys.executable, "bench/transfer.py", "--quick", "--out", str(tmp_path / "t.json"), "--docs", str(docs)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((tmp_path / "t.json").read_text())
    assert list(results["test_accuracy"]) == ["scratch", "fine-tuned", "fine-tuned, head x10", "frozen features"]
    assert all(len(accuracies) == 1 and 0 <= accuracies[0] <= 1 for accuracies in results["test_accuracy"].values())
    assert results["per_class"] == 3 and 0 <= results["pretrain_test_accuracy"] <= 1
    assert sum("--init-from" in command for command in results["commands"]) == 3
    assert "--head-lr-mult 10" in results["commands"][2] and "--freeze features" in results["commands"][3]
    text = docs.read_text()
    assert "Hand-written prose." in text and "| fine-tuned |" in text
