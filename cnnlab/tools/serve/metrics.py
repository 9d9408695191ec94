"""The Prometheus metrics of one server, in a registry of its own (two apps in one process never mix).

A server of several worker processes (`cnnlab serve --workers N`) keeps them in
prometheus-client's multiprocess mode: each worker writes its values to files in
the folder PROMETHEUS_MULTIPROC_DIR names, and whichever worker answers /metrics
adds them up (counters and histograms summed, the pending requests summed over
the live workers, the drift figures the most recent of any live worker's).

Besides the usual traffic figures (requests by route and status, latency, batch
sizes, rejected inputs by reason, predictions by class), two drift signals say
whether the inputs still look like the training data: the mean and standard
deviation of the normalized input pixels (about 0 and 1 on images like those the
model was trained on; a shift means other lighting, inverted colours, another
kind of image) and the share of each class among the recent top-1 predictions.
A third counts the inputs the model's out-of-distribution check flags
(cnnlab/train/calibrate.py), with their moving share.
Both are moving averages over about the last DRIFT_WINDOW images, exact
averages until that many have been seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

DRIFT_WINDOW = 1000  # images
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it when first imported
FRESHEST = "livemostrecent"  # a moving average across workers: the freshest value of a live worker
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, classes: Sequence[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cnnlab_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("cnnlab_request_latency_seconds", "Time to answer a request, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("cnnlab_batch_size", "Images per model call", buckets=BATCH_BUCKETS, registry=r)
        self.ready = Gauge("cnnlab_workers_ready", "Server processes with the model loaded and warmed up", registry=r,
                           multiprocess_mode="livesum")  # fmt: skip
        self.pending = Gauge("cnnlab_pending_requests", "Requests waiting for a batch", registry=r,
                             multiprocess_mode="livesum")  # fmt: skip
        self.predictions = Counter("cnnlab_predictions", "Top-1 predictions by class", ["class"], registry=r)
        self.rejected = Counter("cnnlab_rejected", "Refused requests by reason", ["reason"], registry=r)
        self.input_mean = Gauge("cnnlab_input_mean", "Moving mean of the normalized input pixels (~0 on "
                                "training-like images)", registry=r, multiprocess_mode=FRESHEST)  # fmt: skip
        self.input_std = Gauge("cnnlab_input_std", "Moving std of the normalized input pixels (~1 on "
                               "training-like images)", registry=r, multiprocess_mode=FRESHEST)  # fmt: skip
        self.class_share = Gauge("cnnlab_class_share", "Moving share of each class among top-1 predictions",
                                 ["class"], registry=r, multiprocess_mode=FRESHEST)  # fmt: skip
        self.ood = Counter("cnnlab_out_of_distribution", "Inputs flagged as unlike the training data", registry=r)
        self.ood_share = Gauge("cnnlab_out_of_distribution_share", "Moving share of inputs flagged as unlike the "
                               "training data (about the calibrated flag_rate of /v1/model on training-like images)", registry=r,
                               multiprocess_mode=FRESHEST)  # fmt: skip
        self.classes = list(classes)
        for name in self.classes:  # every class shows from the start, at 0
            self.predictions.labels(name)
            self.class_share.labels(name)
        self._lock = threading.Lock()
        self._seen = 0
        self._mean = 0.0
        self._square = 0.0  # moving mean of x**2
        self._share = torch.zeros(len(self.classes), dtype=torch.float64)
        self._flagged = 0.0  # moving share of flagged inputs

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, x: torch.Tensor, top1: torch.Tensor, flags: torch.Tensor | None) -> None:
        """One model call: x (N, C, H, W) float32 normalized, top1 (N,) int64 class indices, flags (N,) bool
        out of distribution (None: the model has no check)."""
        n = len(x)
        self.batch_size.observe(n)
        counts = torch.bincount(top1, minlength=len(self.classes)).to(torch.float64)
        for index in counts.nonzero().flatten().tolist():
            self.predictions.labels(self.classes[index]).inc(counts[index].item())
        with self._lock:
            self._seen += n
            # Exact averages over the first DRIFT_WINDOW images, then exponential over about that many.
            alpha = max(n / self._seen, 1.0 - (1.0 - 1.0 / DRIFT_WINDOW) ** n)
            self._mean += alpha * (x.mean(dtype=torch.float64).item() - self._mean)
            self._square += alpha * (x.square().mean(dtype=torch.float64).item() - self._square)
            self._share += alpha * (counts / n - self._share)
            if flags is not None:
                flagged = int(flags.sum())
                self.ood.inc(flagged)
                self._flagged += alpha * (flagged / n - self._flagged)
                self.ood_share.set(self._flagged)
            self.input_mean.set(self._mean)
            self.input_std.set(max(self._square - self._mean**2, 0.0) ** 0.5)
            for name, share in zip(self.classes, self._share.tolist()):
                self.class_share.labels(name).set(share)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def workers_ready(self) -> int:
        """How many server processes are warm."""
        return int(self._gathered().get_sample_value("cnnlab_workers_ready") or 0)

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self._gathered())

    def _gathered(self) -> CollectorRegistry:
        """This process's metrics, or in multiprocess mode every worker's, added up from their files."""
        if MULTIPROCESS_DIR not in os.environ:
            return self.registry
        workers = CollectorRegistry()
        MultiProcessCollector(workers)
        return workers
