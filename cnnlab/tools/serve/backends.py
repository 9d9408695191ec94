"""The model a server runs, loaded once: x (N, C, H, W) float32 normalized -> (N, K) logits.

Two backends with one interface. `onnx` (the default) runs the exported graph in
ONNX Runtime: from a model.onnx file, from RUN/export/model.onnx when the run has
one, or from an export made in memory. `torch` runs the checkpoint through
cnnlab's fast forward, the one `cnnlab predict` uses, so its answers are
predict's to the bit. Each knows the ModelInfo the model was trained with and
the SHA-256 of the artefact it runs (the ONNX bytes or the checkpoint file).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from cnnlab.errors import CnnlabError
from cnnlab.fast.forward import fast_forward
from cnnlab.tools.export import ModelInfo, onnx_bytes, read_summary
from cnnlab.train.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path

BACKENDS = ("onnx", "torch")


class Backend(Protocol):
    kind: str  # one of BACKENDS
    info: ModelInfo
    sha256: str  # of the artefact that runs

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float32 normalized -> (N, K) float32 logits. Called from one thread at a time."""
        ...

    def opener(self, threads: int) -> Callable[[], Backend]:
        """What loads this very artefact again, using `threads` CPU threads: picklable, for a server's
        worker processes (the ONNX bytes themselves, not a path that may change meanwhile)."""
        ...


class OnnxBackend:
    kind = "onnx"

    def __init__(self, data: bytes, origin: str, threads: int = 0) -> None:
        """threads: ONNX Runtime's intra-op threads (0: one per core)."""
        import onnxruntime
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        # ONNX Runtime's threads spin for a while after each call by default: between batches
        # that takes a core from the event loop, which reads and decodes the next requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except (ort_errors.InvalidProtobuf, ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidArgument,
                ort_errors.RuntimeException, ort_errors.NotImplemented) as exc:  # fmt: skip
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CnnlabError(f"{origin} is not an ONNX model ONNX Runtime can run ({first_line})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map.get("cnnlab")
        if metadata is None:
            raise CnnlabError(f"{origin} has no cnnlab metadata: serve a model written by `cnnlab export`, or its run")
        try:
            self.info = ModelInfo.from_dict(json.loads(metadata), origin)
        except ValueError:  # the JSON itself is broken
            raise CnnlabError(f"{origin} has unreadable cnnlab metadata: export it again (`cnnlab export`)") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._data, self._origin = data, origin
        self._input = self.session.get_inputs()[0]
        self._output = self.session.get_outputs()[0].name
        if [d for d in self._input.shape[1:] if isinstance(d, int)] != list(self.info.in_shape):
            raise CnnlabError(f"{origin} takes inputs {self._input.shape}, but its metadata says {self.info.in_shape}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run([self._output], {self._input.name: x.numpy()})[0])

    def opener(self, threads: int) -> Callable[[], Backend]:
        return functools.partial(OnnxBackend, self._data, self._origin, threads)


class TorchBackend:
    kind = "torch"

    def __init__(self, checkpoint: Checkpoint, info: ModelInfo, sha256: str) -> None:
        self.info = info
        self.sha256 = sha256
        # What a worker process rebuilds the model from (opener): the weights, not the state to resume training.
        self.checkpoint = dataclasses.replace(checkpoint, optimizer_state=None, training_state=None, rng=None)
        self.model = checkpoint.build_model()  # eval mode, CPU
        self.forward = fast_forward(self.model)  # what Predictor runs (cnnlab/tools/predict.py)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def opener(self, threads: int) -> Callable[[], Backend]:
        return functools.partial(_torch_backend, self.checkpoint, self.info, self.sha256, threads)


def _torch_backend(checkpoint: Checkpoint, info: ModelInfo, sha256: str, threads: int) -> TorchBackend:
    """TorchBackend in a worker process that uses `threads` CPU threads."""
    torch.set_num_threads(threads)
    return TorchBackend(checkpoint, info, sha256)


def load_backend(source: Path, kind: str = "onnx") -> Backend:
    """The model at `source` (a run directory, a checkpoint, or a model.onnx) as backend `kind`."""
    if kind not in BACKENDS:
        raise CnnlabError(f"unknown backend '{kind}': choose {' or '.join(BACKENDS)}")
    source = Path(source)
    if source.suffix == ".onnx":
        if kind == "torch":
            raise CnnlabError(f"--backend torch runs a checkpoint, and {source} is an ONNX file: pass the run instead")
        if not source.is_file():
            raise CnnlabError(f"{source} does not exist: pass a model.onnx written by `cnnlab export`, or a run")
        return OnnxBackend(source.read_bytes(), str(source))
    path = resolve_checkpoint_path(source)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    if kind == "onnx" and run_dir is not None and (run_dir / "export" / "model.onnx").is_file():
        exported = run_dir / "export" / "model.onnx"
        return OnnxBackend(exported.read_bytes(), str(exported))
    checkpoint = load_checkpoint(path)
    info = ModelInfo.of(checkpoint, read_summary(run_dir).get("test_accuracy"))
    if kind == "torch":
        return TorchBackend(checkpoint, info, hashlib.sha256(path.read_bytes()).hexdigest())
    # No export on disk: one in memory, as `cnnlab export` would write it.
    data = onnx_bytes(checkpoint.build_model(), torch.zeros(2, *info.in_shape), info)
    return OnnxBackend(data, f"{path} (exported in memory)")
