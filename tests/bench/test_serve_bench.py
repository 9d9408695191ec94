"""bench/serve.py --quick runs for real: both servers start, take load in turns, answer every request,
and the results file holds what its table reads. The figures of a quick run mean nothing."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def test_serve_bench_loads_both_servers_in_turns_without_errors(trained_run, tmp_path):
    out = tmp_path / "serve.json"
    command = [sys.executable, "bench/serve.py", "--quick", "--run", str(trained_run), "--out", str(out)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert finished.returncode == 0, finished.stderr[-3000:]

    results = json.loads(out.read_text())
    assert results["quick"] and results["machine"]["torch"] == torch.__version__ and results["date"]
    assert "serve.py" in results["command"] and "--quick" in results["command"]
    assert results["order"] == [["seed_flask", "cnnlab"], ["cnnlab", "seed_flask"]]  # turns, a b then b a
    assert set(results["servers"]) == {"seed_flask", "cnnlab"}
    cnnlab_command = results["servers"]["cnnlab"]["command"]
    assert cnnlab_command[cnnlab_command.index("--workers") + 1] == str(results["workers"]) == str(os.cpu_count())
    for server in results["servers"].values():
        assert server["requests"] > 0 and server["requests_per_s"] > 0
        assert server["errors"]["non_200"] == 0 and server["errors"]["exceptions"] == 0, server["errors"]
        latency = server["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert server["rss_mb"]["start"] > 0 and server["rss_mb"]["end"] > 0
        assert server["rss_mb"]["growth_pct"] is not None
        assert len(server["windows"]) == results["rounds"]
        assert 0 < server["generator_cpu_share_max"] < 1.5  # of one core: one asyncio process
        assert server["top1_accuracy"] > 0.5  # the same trained LeNet-5 behind both
    ratios = results["ratios"]
    assert ratios["requests_per_s"] > 0 and ratios["p99"] > 0
    assert len(ratios["requests_per_s_each_round"]) == results["rounds"]
    assert "| (b) cnnlab serve |" in finished.stdout and "b/a: requests/s" in finished.stdout



def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def descendants(pid: int) -> set[int]:
    found = children(pid)
    for child in list(found):
        try:
            found |= descendants(child)
        except OSError:  # gone meanwhile
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
def test_a_terminated_bench_stops_both_servers_and_their_workers(trained_run, tmp_path):
    command = [sys.executable, "bench/serve.py", "--quick", "--duration", "60", "--run", str(trained_run),
               "--out", str(tmp_path / "serve.json")]  # fmt: skip
    bench = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in bench.stdout:
            if line.startswith("servers ready"):
                break
        servers = children(bench.pid)
        assert len(servers) >= 2 and all(alive(pid) for pid in servers)
        servers = descendants(bench.pid)  # cnnlab serve's worker processes too
        assert len(servers) >= 2 + os.cpu_count()
        bench.terminate()
        assert bench.wait(timeout=60) != 0
    finally:
        bench.kill()
        bench.wait()
    # The servers are stopped before the bench exits; a generator it was starting gets SIGTERM as it dies.
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in servers)
    assert not (tmp_path / "serve.json").exists()
