"""SIGKILL, not a polite signal: `cnnlab train` killed again and again, resumed each time, ends as if never stopped.

The harness is bench/faults.py (`python bench/faults.py --kills 100` for the full
size); here it runs small: 5 kills. The kills here land before training starts
(the rerun or resume path) or just after an epoch's line (the resume path, from a
complete epoch); bench/faults.py also kills inside checkpoint saves.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

spec = importlib.util.spec_from_file_location("faults", Path(__file__).resolve().parents[2] / "bench" / "faults.py")
faults = sys.modules["faults"] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up there
spec.loader.exec_module(faults)


def test_a_run_killed_five_times_and_resumed_ends_with_the_straight_runs_weights(tmp_path):
    report = faults.run_with_faults(tmp_path, kills=5, epochs=5, seed=3, kinds=("startup", "epoch"))
    assert report.problems() == []
    assert report.kills == 5 and report.resumes + report.reruns == 5
    assert report.identical == {"best.pt": True, "last.pt": True}
    assert report.metrics_epochs == [1, 2, 3, 4, 5] and not report.leftover_temp_files
    assert not report.unloadable and not report.crashes and report.checkpoint_loads > 0
