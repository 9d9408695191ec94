"""Serving LeNet-5 over HTTP, side by side: the seed tutorial's Flask app and `cnnlab serve`.

    (a) seed tutorial  bench/seed_serve.py: Flask's threaded server, PIL and hand-written
                       transforms, eager `model(x)` per request
    (b) cnnlab serve   `python -m cnnlab serve RUN --workers N`: FastAPI and uvicorn,
                       micro-batches, ONNX Runtime, N worker processes (default: one per
                       logical CPU)

Both load the same trained run (`--run`, or a LeNet-5 trained on digits for 3 epochs at
the start) and run at once, each in a process of its own on 127.0.0.1. A closed loop of
`--clients` connections sends the test split's images, PNG-encoded once, as multipart
`file` to one server for `--duration` seconds (after `--warmup` seconds not counted),
then to the other: a b in even rounds, b a in odd ones (as harness.alternate), so that
the host's drift falls on both. The load generator is this file run in a process of
its own (`serve.py generate`): raw asyncio streams over keep-alive connections, the
requests built once, its CPU share over each window reported so a reader can tell it
was not the bottleneck.

With `--baseline REF`, a third server joins them: (c) cnnlab serve as of the git
commit REF (extracted with `git archive`, run from its own folder in the same Python
environment), so that a change to the server is measured side by side with what it
changed, under the same load on the same host at the same time.

Per server: requests/s, latency p50/p95/p99 (pooled over the rounds), errors (non-200
answers and exceptions), top-1 accuracy of the answers, server RSS (VmRSS, summed over
its processes) before the first window and after the last, its CPU per request (all its
processes); ratios b/a (and b/c) of
requests/s and p99, pooled and per round.

    python bench/serve.py [--run RUN] [--clients 64] [--duration 60] [--rounds 2] [--soak S] [--workers N]
                          [--baseline REF] [--quick] [--out PATH]

Results go to bench/results/serve.json (a --quick run's to the temporary folder).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

# The load generator runs this file in a process of its own and must stay light: torch,
# cnnlab and harness (which imports torch) are imported by the orchestrating side only.

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOST = "127.0.0.1"
BOUNDARY = "cnnlab-bench-boundary"
MAX_IMAGES = 500  # distinct request bodies, cycled
REQUEST_TIMEOUT = 30.0  # seconds for one request, connection included
STARTUP_TIMEOUT = 180.0  # seconds for a server to load, export (cnnlab) and answer
STOP_TIMEOUT = 15.0  # seconds between terminate and kill
QUICK = {"clients": 4, "duration": 1.5, "warmup": 0.3, "rounds": 2}

# (key, label, predict path); with --baseline, ("baseline", "(c) cnnlab serve at REF", the same path) joins them
SERVERS = (
    ("seed_flask", "(a) seed tutorial's Flask app", "/predict"),
    ("cnnlab", "(b) cnnlab serve", "/v1/predict?top_k=1"),
)


# The load generator (its own process)


def multipart_body(png: bytes) -> bytes:
    """`png` as the multipart form's one field, `file`."""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def multipart_request(path: str, port: int, png: bytes) -> bytes:
    """One whole HTTP/1.1 POST of `png` as multipart field `file`, keep-alive."""
    body = multipart_body(png)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the connection stays open) of one response with a Content-Length."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    version, status = head[0].split(" ", 2)[:2]
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in head[1:] if ":" in line))
    if "content-length" not in headers:
        raise ValueError("a response without Content-Length")
    body = await reader.readexactly(int(headers["content-length"]))
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return int(status), body, keep


def top_class(body: bytes) -> str | None:
    """The most likely class in either server's answer."""
    answer = json.loads(body)
    if "predictions" in answer:  # cnnlab: {"predictions": [{"classes": [...], "probabilities": [...]}]}
        return answer["predictions"][0]["classes"][0]
    return answer.get("class")  # the seed app: {"class", "probability"}


class Tally:
    """What the clients of one window saw: latencies of the answers counted, statuses, exceptions."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.exceptions: dict[str, int] = {}
        self.correct = 0
        self.answered = 0  # every answer, warm-up included: the server's work in the window
        self.unreadable = 0  # 200 answers whose JSON held no class


async def client(requests: list[tuple[bytes, str]], first: int, port: int, measure_from: float, deadline: float,
                 tally: Tally) -> None:  # fmt: skip
    """A closed loop on one connection: send, wait for the answer, send the next, until `deadline`."""
    reader = writer = None
    index = first
    while time.perf_counter() < deadline:
        request, label = requests[index % len(requests)]
        index += 1
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(request)
            status, body, keep = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
            outcome: int | str = status
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError) as exc:  # fmt: skip
            outcome, keep = type(exc).__name__, False
        ended = time.perf_counter()
        if isinstance(outcome, str):
            await asyncio.sleep(0.01)  # a refused connection fails at once: do not spin
        if not keep and writer is not None:
            writer.close()
            reader = writer = None
        tally.answered += isinstance(outcome, int)
        if started < measure_from or ended > deadline:
            continue
        if isinstance(outcome, str):
            tally.exceptions[outcome] = tally.exceptions.get(outcome, 0) + 1
            continue
        tally.statuses[outcome] = tally.statuses.get(outcome, 0) + 1
        tally.latencies.append(ended - started)
        if outcome == 200:
            try:
                tally.correct += top_class(body) == label
            except (ValueError, KeyError, IndexError, TypeError):
                tally.unreadable += 1
    if writer is not None:
        writer.close()


async def generate_load(requests: list[tuple[bytes, str]], port: int, clients: int, warmup: float,
                        duration: float) -> dict:  # fmt: skip
    """`clients` closed loops for `warmup` + `duration` seconds; the figures of the last `duration`."""
    tally = Tally()
    measure_from = time.perf_counter() + warmup
    deadline = measure_from + duration
    cpu: list[tuple[float, float]] = []

    async def sample_cpu_at(moment: float) -> None:
        await asyncio.sleep(max(0.0, moment - time.perf_counter()))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append((time.perf_counter(), usage.ru_utime + usage.ru_stime))

    spread = max(1, len(requests) // clients)  # clients start at different images
    sampler = asyncio.ensure_future(sample_cpu_at(measure_from))
    await asyncio.gather(*(client(requests, i * spread, port, measure_from, deadline, tally) for i in range(clients)))
    await sampler
    await sample_cpu_at(0.0)
    (start_wall, start_cpu), (end_wall, end_cpu) = cpu
    return {
        "seconds": duration,
        "latencies_s": [round(v, 6) for v in tally.latencies],
        "statuses": {str(k): v for k, v in tally.statuses.items()},
        "exceptions": tally.exceptions,
        "correct": tally.correct,
        "unreadable": tally.unreadable,
        "answered_with_warmup": tally.answered,
        # of one core, over the window and the answers still in flight at its end
        "generator_cpu_share": round((end_cpu - start_cpu) / max(end_wall - start_wall, 1e-9), 4),
    }


def generate_main(argv: list[str]) -> int:
    """`serve.py generate`: one window of load against one server, its figures as JSON."""
    parser = argparse.ArgumentParser(description="the load generator of bench/serve.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--images", type=Path, required=True, help="JSON: base64 PNGs and their class names")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parent", type=int, help="the bench's process id: the generator ends when it does")
    args = parser.parse_args(argv)
    if args.parent is not None:
        die_with(args.parent)
    images = json.loads(args.images.read_text())
    requests = [(multipart_request(args.path, args.port, base64.b64decode(png)), label)
                for png, label in zip(images["png"], images["labels"])]  # fmt: skip
    figures = asyncio.run(generate_load(requests, args.port, args.clients, args.warmup, args.duration))
    args.out.write_text(json.dumps(figures))
    return 0


def die_with(parent: int) -> None:
    """Have Linux send this process SIGTERM when its parent, the bench, dies; exit now if it already has.

    The bench stops what it started in `finally` blocks, but a SIGTERM that lands while Popen is
    still starting the generator (forked, Popen not yet returned) leaves it unknown to them."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the bench died before the line above
        sys.exit(143)


# The servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (a server's workers), from /proc's children lists."""
    pids, index = [pid], 0
    while index < len(pids):
        try:
            for task in Path(f"/proc/{pids[index]}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            pass
        index += 1
    return pids


def _summed(pid: int, read: Callable[[int], float | None]) -> float | None:
    """read(p) summed over `pid` and its children (a process that is gone, or where /proc does not say,
    counts nothing); None when no process said anything."""
    values = []
    for each in process_tree(pid):
        try:
            values.append(read(each))
        except OSError:  # gone meanwhile
            pass
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def _rss_mb_of(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _cpu_seconds_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    """Resident memory (VmRSS) of process `pid` and its children, summed, in MiB."""
    total = _summed(pid, _rss_mb_of)
    return None if total is None else round(total, 1)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time so far of process `pid` and its children (utime and stime of /proc/PID/stat)."""
    return _summed(pid, _cpu_seconds_of)


class Server:
    """A server in its own process, its output in a log file; `stop` terminates it, then kills it."""

    def __init__(self, key: str, label: str, path: str, command: list[str], log: Path, root: Path = ROOT) -> None:
        self.key, self.label, self.path, self.command, self.log_path = key, label, path, command, log
        self.root = root  # the cnnlab checkout it runs from
        self.port = int(command[command.index("--port") + 1])
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        paths = [str(self.root), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)  # fmt: skip

    def wait_ready(self, probe: urllib.request.Request, deadline: float) -> None:
        """Until `probe` answers 200; a server that exits or misses `deadline` is an error, with its log."""
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(probe, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} was not ready within {STARTUP_TIMEOUT:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.label} exited with status {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The orchestration


def readiness_probe(server: Server, png: bytes) -> urllib.request.Request:
    """cnnlab's /readyz; the tutorial's app has no such route: it is ready when it answers a prediction."""
    if server.key != "seed_flask":
        return urllib.request.Request(f"http://{HOST}:{server.port}/readyz")
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return urllib.request.Request(f"http://{HOST}:{server.port}{server.path}", multipart_body(png), headers)


def checkout(ref: str, folder: Path) -> Path:
    """cnnlab's files as of git commit `ref`, extracted into `folder`."""
    import io
    import tarfile

    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], check=True,
                                 capture_output=True, timeout=60).stdout  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--baseline {ref}: git archive failed: {exc.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def train_run(folder: Path) -> Path:
    """A LeNet-5 trained on the built-in digits for 3 epochs, in `folder`."""
    command = [sys.executable, "-m", "cnnlab", "train", "--dataset", "digits", "--epochs", "3",
               "--runs-dir", str(folder), "--name", "bench-serve"]  # fmt: skip
    print("training the model to serve:", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, timeout=900, stdout=subprocess.DEVNULL)
    return folder / "bench-serve"


def test_images(run: Path, path: Path) -> dict:
    """The first MAX_IMAGES test images of the run's dataset, PNG-encoded once, written to `path`."""
    import io

    from PIL import Image

    from cnnlab.data.sources import get_source
    from cnnlab.train.checkpoint import load_checkpoint, resolve_checkpoint_path

    checkpoint = load_checkpoint(resolve_checkpoint_path(run))
    _, test = get_source(checkpoint.dataset).load(None)
    pngs = []
    for image in test.images[:MAX_IMAGES]:  # (C, H, W) uint8
        pixels = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pngs.append(base64.b64encode(buffer.getvalue()).decode())
    labels = [test.classes[int(y)] for y in test.labels[:MAX_IMAGES]]
    images = {"png": pngs, "labels": labels, "dataset": checkpoint.dataset, "model": checkpoint.model["name"]}
    path.write_text(json.dumps(images))
    return images


def one_window(server: Server, images: Path, clients: int, warmup: float, duration: float, scratch: Path) -> dict:
    """`clients` closed loops against `server` for one window, from a generator process; the server's RSS
    and CPU time around it."""
    out = scratch / f"window-{server.key}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "generate", "--port", str(server.port),
               "--path", server.path, "--images", str(images), "--clients", str(clients),
               "--warmup", str(warmup), "--duration", str(duration), "--out", str(out),
               "--parent", str(os.getpid())]  # fmt: skip
    server.check_alive()
    rss_before, cpu_before, started = rss_mb(server.process.pid), cpu_seconds(server.process.pid), time.monotonic()
    # subprocess.run kills the generator if it overruns
    subprocess.run(command, cwd=ROOT, check=True, timeout=warmup + duration + REQUEST_TIMEOUT + 60)
    cpu_after, wall = cpu_seconds(server.process.pid), time.monotonic() - started
    server.check_alive()
    window = json.loads(out.read_text())
    window["rss_mb_before"], window["rss_mb_after"] = rss_before, rss_mb(server.process.pid)
    if cpu_before is not None and cpu_after is not None:
        window["server_cpu_s"] = round(cpu_after - cpu_before, 2)
        window["server_cpu_share"] = round((cpu_after - cpu_before) / wall, 3)  # of one core
        window["server_cpu_ms_per_request"] = round(1000 * (cpu_after - cpu_before) /
                                                    max(1, window["answered_with_warmup"]), 3)  # fmt: skip
    return window


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1) of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(label: str, command: list[str], windows: list[dict]) -> dict:
    """One server's figures over all its windows: rates over the summed time, latencies pooled."""
    latencies = sorted(v for w in windows for v in w["latencies_s"])
    requests = len(latencies)
    seconds = sum(w["seconds"] for w in windows)
    statuses: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    for w in windows:
        for k, v in w["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in w["exceptions"].items():
            exceptions[k] = exceptions.get(k, 0) + v
    ok = statuses.get("200", 0)
    rss_start, rss_end = windows[0]["rss_mb_before"], windows[-1]["rss_mb_after"]
    cpu_ms = [w["server_cpu_ms_per_request"] for w in windows if "server_cpu_ms_per_request" in w]
    return {
        "label": label,
        "command": command,
        "requests": requests,
        "seconds": seconds,
        "requests_per_s": round(requests / seconds, 1) if seconds else 0.0,
        "latency_ms": {
            "p50": round(1000 * percentile(latencies, 0.50), 2) if latencies else None,
            "p95": round(1000 * percentile(latencies, 0.95), 2) if latencies else None,
            "p99": round(1000 * percentile(latencies, 0.99), 2) if latencies else None,
            "max": round(1000 * latencies[-1], 2) if latencies else None,
        },
        "errors": {
            "non_200": requests - ok,
            "exceptions": sum(exceptions.values()),
            "statuses": statuses,
            "exception_kinds": exceptions,
            "unreadable_answers": sum(w["unreadable"] for w in windows),
        },
        "top1_accuracy": round(sum(w["correct"] for w in windows) / ok, 4) if ok else None,
        "rss_mb": {
            "start": rss_start,
            "end": rss_end,
            "growth_pct": round(100 * (rss_end - rss_start) / rss_start, 1) if rss_start and rss_end else None,
            "after_each_window": [w["rss_mb_after"] for w in windows],
        },
        "server_cpu_ms_per_request": round(sum(cpu_ms) / len(cpu_ms), 3) if cpu_ms else None,
        "generator_cpu_share_max": max(w["generator_cpu_share"] for w in windows),
        "windows": [
            {k: v for k, v in w.items() if k != "latencies_s"}
            | {"requests_per_s": round(len(w["latencies_s"]) / w["seconds"], 1),
               "p99_ms": round(1000 * percentile(sorted(w["latencies_s"]), 0.99), 2) if w["latencies_s"] else None}
            for w in windows
        ],  # fmt: skip
    }


def ratios(a: dict, b: dict) -> dict:
    """b/a of requests/s (> 1: b serves more) and of p99 latency (< 1: b answers sooner), pooled and per round."""

    def ratio(top: float | None, bottom: float | None) -> float | None:
        return round(top / bottom, 2) if top and bottom else None

    pairs = list(zip(a["windows"], b["windows"]))
    return {
        "requests_per_s": ratio(b["requests_per_s"], a["requests_per_s"]),
        "requests_per_s_each_round": [ratio(wb["requests_per_s"], wa["requests_per_s"]) for wa, wb in pairs],
        "p99": ratio(b["latency_ms"]["p99"], a["latency_ms"]["p99"]),
        "p99_each_round": [ratio(wb["p99_ms"], wa["p99_ms"]) for wa, wb in pairs],
    }


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"Measured {results['date']} on {machine['cpu']} ({machine['logical_cpus']} logical CPUs, torch "
        f"{machine['torch']}, Python {machine['python']}); load average {results['load_average']['before']} before, "
        f"{results['load_average']['after']} after. Command: `{results['command']}`. {results['model']} trained on "
        f"{results['dataset']}; cnnlab serve with {results['workers']} worker process"
        f"{'es' if results['workers'] > 1 else ''}; {results['clients']} concurrent keep-alive clients in a closed loop, "
        f"{results['duration_s']:g} s per server per round after {results['warmup_s']:g} s of warm-up, "
        f"{results['rounds']} rounds ({', '.join(' '.join(o) for o in results['order'])}); "
        "latencies pooled over the rounds."
        + (" Quick mode: figures are not meaningful." if results["quick"] else ""),
        "",
        "| server | requests/s | p50 | p95 | p99 | errors | top-1 of answers | RSS start → end (growth) "
        "| server CPU per request | generator CPU (max, of one core) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["servers"].values():
        latency, rss = s["latency_ms"], s["rss_mb"]
        errors = s["errors"]["non_200"] + s["errors"]["exceptions"]
        accuracy = "-" if s["top1_accuracy"] is None else f"{100 * s['top1_accuracy']:.1f}%"
        lines.append(
            f"| {s['label']} | {s['requests_per_s']:,.0f} | {latency['p50']} ms | {latency['p95']} ms | "
            f"{latency['p99']} ms | {errors} | {accuracy} | "
            f"{rss['start']} → {rss['end']} MiB ({rss['growth_pct']:+}%) | {s['server_cpu_ms_per_request']} ms | "
            f"{100 * s['generator_cpu_share_max']:.0f}% |"
        )
    r = results["ratios"]

    def each(values: list) -> str:
        return f" ({', '.join('-' if v is None else f'x{v}' for v in values)})" if len(values) > 1 else ""

    lines += [
        "",
        f"b/a: requests/s x{r['requests_per_s']}{each(r['requests_per_s_each_round'])}; "
        f"p99 latency x{r['p99']}{each(r['p99_each_round'])} (per round in brackets).",
    ]
    if "baseline_ratios" in results:
        r = results["baseline_ratios"]
        lines.append(f"b/c: requests/s x{r['requests_per_s']}{each(r['requests_per_s_each_round'])}; "
                     f"p99 latency x{r['p99']}{each(r['p99_each_round'])}.")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from harness import bench_parser, load_average, results_path, write_results

    parser = bench_parser(__doc__.splitlines()[0], dataset=False)
    parser.add_argument("--run", type=Path, help="the run (or checkpoint) to serve; default: train LeNet-5 on "
                        "digits for 3 epochs first")  # fmt: skip
    parser.add_argument("--clients", type=int, help="concurrent connections (default 64; 4 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds of load per server per round (default 60)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each window, not counted (default 2)")
    parser.add_argument("--rounds", type=int, help="rounds, each server once per round (default 2)")
    parser.add_argument("--soak", type=float, metavar="S", help="a long run for memory growth: S seconds per "
                        "server in one round (300 or more to see a leak)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="cnnlab serve's worker processes (default: one per logical CPU)")
    parser.add_argument("--baseline", metavar="REF", help="also serve with cnnlab as of git commit REF, as server (c), "
                        "to measure a change side by side")  # fmt: skip
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"clients": 64, "duration": 60.0, "warmup": 2.0, "rounds": 2}
    if args.soak is not None:
        defaults = {**defaults, "duration": args.soak, "rounds": 1}
    clients = args.clients or defaults["clients"]
    duration = args.duration or defaults["duration"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    rounds = args.rounds or defaults["rounds"]
    if not (1 <= clients <= 1024 and 0 < duration <= 3600 and 0 <= warmup <= 60 and 1 <= rounds <= 20):
        parser.error("--clients 1..1024, --duration/--soak 0..3600 s, --warmup 0..60 s, --rounds 1..20")
    if not 1 <= args.workers <= 64:
        parser.error("--workers 1..64")
    if args.run is not None and not args.run.exists():
        parser.error(f"--run {args.run} does not exist")
    out = results_path("serve", args.quick, args.out)

    # SIGTERM runs the finally blocks below, which stop every server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, load_before = time.time(), load_average()
    with tempfile.TemporaryDirectory(prefix="cnnlab-bench-serve-") as scratch_name:
        scratch = Path(scratch_name)
        run = args.run.resolve() if args.run else train_run(scratch / "runs")
        images = test_images(run, scratch / "images.json")
        contenders = list(SERVERS)
        commands = {
            "seed_flask": [sys.executable, str(BENCH / "seed_serve.py"), str(run), "--port", str(free_port())],
            "cnnlab": [sys.executable, "-m", "cnnlab", "serve", str(run), "--port", str(free_port()),
                       "--workers", str(args.workers)],
        }
        roots = {"baseline": checkout(args.baseline, scratch / "baseline")} if args.baseline else {}
        if args.baseline:
            contenders.append(("baseline", f"(c) cnnlab serve at {args.baseline}", "/v1/predict?top_k=1"))
            commands["baseline"] = [sys.executable, "-m", "cnnlab", "serve", str(run), "--port", str(free_port())]
        servers = [Server(key, label, path, commands[key], scratch / f"{key}.log", roots.get(key, ROOT))
                   for key, label, path in contenders]  # fmt: skip
        try:
            for server in servers:
                server.start()
            deadline = time.monotonic() + STARTUP_TIMEOUT
            probe_image = base64.b64decode(images["png"][0])
            for server in servers:
                server.wait_ready(readiness_probe(server, probe_image), deadline)
            names = ", ".join(server.key for server in servers)
            plan = f"{rounds} rounds of {duration:g} s per server, {clients} clients"
            print(f"servers ready ({names}); {plan}", flush=True)
            windows: dict[str, list[dict]] = {server.key: [] for server in servers}
            order = []
            for turn in range(rounds):
                ordered = servers if turn % 2 == 0 else servers[::-1]
                order.append([server.key for server in ordered])
                for server in ordered:
                    window = one_window(server, scratch / "images.json", clients, warmup, duration, scratch)
                    windows[server.key].append(window)
                    print(f"round {turn + 1} {server.key}: {len(window['latencies_s']) / duration:,.0f} requests/s, "
                          f"generator CPU {100 * window['generator_cpu_share']:.0f}%", flush=True)  # fmt: skip
        finally:
            for server in servers:
                server.stop()

    summaries = {key: summarize(label, commands[key], windows[key]) for key, label, _ in contenders}
    results = {
        "benchmark": "serving LeNet-5 over HTTP: the seed tutorial's Flask app against cnnlab serve",
        "quick": args.quick,
        "run": str(args.run) if args.run else "trained at the start (digits, 3 epochs)",
        "model": images["model"],
        "dataset": images["dataset"],
        "images": len(images["png"]),
        "clients": clients,
        "workers": args.workers,
        "duration_s": duration,
        "warmup_s": warmup,
        "rounds": rounds,
        "order": order,
        "generator": "bench/serve.py generate: raw asyncio streams, keep-alive, one process",
        "servers": summaries,
        "ratios": ratios(summaries["seed_flask"], summaries["cnnlab"]),
        **(
            {"baseline": args.baseline, "baseline_ratios": ratios(summaries["baseline"], summaries["cnnlab"])}
            if args.baseline
            else {}
        ),
        "load_average": {"before": load_before, "after": load_average()},
        "wall_s": round(time.time() - started, 1),
    }
    print(markdown(write_results(out, results, started)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["generate"]:
        sys.exit(generate_main(sys.argv[2:]))
    sys.exit(main())
