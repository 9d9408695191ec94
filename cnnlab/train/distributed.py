"""Data-parallel training: one process per core or GPU, each on its shard of every batch.

`torchrun --nproc-per-node N -m cnnlab train ...` (or `cnnlab train --nproc N`, which
runs torchrun on this machine) starts N processes, the ranks, that each run the same
`fit` (cnnlab.train.loop) on the whole dataset in memory:

    every rank                    the same global batch of B images, from the shared shuffling generator
    rank r of W                   rows [r*n/W, (r+1)*n/W) of it, n = B but in an epoch's last batch (`shard`)
    its engine (either one)       those rows' share of the batch's mean loss, sum / n, and its gradient (P,)
    all_reduce(sum)               of that flat gradient and the loss: the whole batch's (`_reduce_step`)
    every rank                    the same clipping and update, so the weights stay the same on all

The engines hand their gradient over as one flat vector after the backward pass, so
one all-reduce per step does what DistributedDataParallel's bucketed reducer does
(without overlapping it with the backward pass), for the hand-written engine as for
autograd. The backend is gloo for CPU tensors and NCCL for CUDA ones.

Validation and test: rank r evaluates rows [r*N/W, (r+1)*N/W) of the split and the
predictions are gathered, so every image counts once. Rank 0 alone writes the run
directory and prints; the other ranks keep the checkpoint they would save as "best"
in memory (`FollowerRun`), for the test at the end. Random streams: the data order
comes from the shuffling generator, the same on every rank; augmentation and the
global generator (dropout) draw from a stream per rank, seeded with seed + rank, and
every rank's states go into rank 0's checkpoints, so --resume continues each exactly.

One process (no torchrun, or a job of one) runs none of this: `World()` is a
no-op at every hook, and such a run stays bit for bit what it was.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cnnlab.backprop.norm import BatchNorm
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import ImageDataset, Normalization
from cnnlab.errors import CnnlabError
from cnnlab.train.checkpoint import Checkpoint
from cnnlab.train.evaluate import Evaluation, evaluate
from cnnlab.train.rundir import RunDirectory

# How long a collective waits for a rank that does not come before the job fails. A rank
# that dies closes its connections and fails its peers at once; this bounds the rest
# (a rank stuck, or a node gone without a word).
TIMEOUT = timedelta(seconds=120)
T = TypeVar("T")
EXIT_USAGE = 2  # what the other ranks exit with when rank 0 refuses the job (cnnlab.cli's for a CnnlabError)


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job: rank of size, and its rank on its own machine.

    restart: how many times torchrun restarted the job after a failure (0 on its first try);
    max_restarts: how many it may (torchrun --max-restarts).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    restart: int = 0
    max_restarts: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def refuse(self, message: str) -> None:
        """End the job for a reason every rank found: rank 0 says it (one line, exit 2), the others exit quietly."""
        if self.rank == 0:
            raise CnnlabError(message)
        raise SystemExit(EXIT_USAGE)

    def agree(self, check: Callable[[], T]) -> T:
        """check() on every rank; a CnnlabError on any ends the job with one line from rank 0.

        For the steps before training whose mistakes every rank would find alike (options,
        data): one rank says so, not all of them. A failure only some ranks meet is named by rank.
        """
        if not self.distributed:
            return check()
        result, problem = None, None
        try:
            result = check()
        except CnnlabError as exc:
            problem = str(exc)
        problems: list[Any] = [None] * self.size
        dist.all_gather_object(problems, problem)
        for rank, problem in enumerate(problems):
            if problem is not None:
                self.refuse(problem if rank == 0 else f"rank {rank}: {problem}")
        return result

    def check(self, config: TrainConfig, device: torch.device) -> None:
        """Refuse a job its ranks cannot run together; on every rank, before anything is written."""
        problem = _config_mismatch(config) if self.distributed else None
        if problem is None:
            problem = launch_problem(config, self.size, self.local_size, device)
        if problem is None and self.max_restarts and config.name is None:
            problem = "torchrun --max-restarts restarts the job, which then finds its run by name: pass --name"
        if problem is not None:
            self.refuse(problem)

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its own GPU on a CUDA machine (LOCAL_RANK), else `device`."""
        if device.type != "cuda" or not self.distributed:
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def seed_ranks(self, seed: int, augmenter: Any) -> None:
        """Give the global generator (dropout) and the augmenter's a stream per rank, from seed + rank.

        Called once the model is initialised, which drew from `seed` alike on every rank.
        """
        if not self.distributed:
            return
        torch.manual_seed(seed + self.rank)
        if augmenter is not None:
            augmenter.load_state_dict({"generator": torch.Generator().manual_seed(seed + self.rank).get_state()})

    def attach(self, engine: Any, sync_bn: bool) -> None:
        """Make `engine`'s step sum every rank's gradient and loss before it clips and updates.

        sync_bn: batch-norm layers normalise with the whole global batch's statistics
        (the hand-written layers' `reduce`; for autograd, `_SyncBatchNorm`).
        """
        if not self.distributed:
            return
        engine.step.reduce = _reduce_step
        if not sync_bn:
            return
        for module in engine.model.modules():
            if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
                # The same object, so the engine's forward and the checkpoints see it; only its forward changes.
                module.__class__ = _SyncBatchNorm
        for network in getattr(engine, "networks", ()):
            for layer in _backprop_layers(network):
                if isinstance(layer, BatchNorm):
                    layer.reduce = _sum_over_ranks

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch's row indices (n,): rows[r*n//W : (r+1)*n//W]."""
        if not self.distributed:
            return rows
        n = len(rows)
        return rows[self.rank * n // self.size : (self.rank + 1) * n // self.size]

    def total(self, count: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a 0-dim count (each rank's correct predictions)."""
        if not self.distributed:
            return count
        summed = count.detach().cpu().clone()  # gloo reduces CPU tensors, whichever the device
        dist.all_reduce(summed)
        return summed

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank: a stop asked of one rank stops them all at the same epoch."""
        if not self.distributed:
            return flag
        flags = torch.tensor(int(flag))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags)

    def agree_buffers(self, *modules: nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) for every rank, as DDP broadcasts them.

        Each rank updates its own from its own shard; rank 0's are the ones checkpoints keep.
        """
        if not self.distributed:
            return
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def evaluate(self, model: nn.Module, data: ImageDataset, normalization: Normalization) -> Evaluation:
        """`evaluate` over the whole of `data`, each rank running its share of the images once."""
        if not self.distributed or len(data) == 0:
            return evaluate(model, data, normalization)
        n = len(data)
        bounds = [r * n // self.size for r in range(self.size + 1)]
        start, stop = bounds[self.rank], bounds[self.rank + 1]
        own = evaluate(
            model, ImageDataset(data.images[start:stop], data.labels[start:stop], data.classes), normalization
        )
        loss_sum = torch.tensor(own.loss * (stop - start) if stop > start else 0.0, dtype=torch.float64)
        dist.all_reduce(loss_sum)
        width = max(b - a for a, b in pairwise(bounds))
        padded = torch.full((width,), -1, dtype=torch.int64)  # all_gather takes tensors of one shape
        padded[: stop - start] = own.predictions
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded)
        predictions = torch.cat([g[: b - a] for g, (a, b) in zip(gathered, pairwise(bounds))])  # (N,) int64
        accuracy = (predictions == data.labels.cpu()).to(torch.float64).mean().item()
        return Evaluation(loss_sum.item() / n, accuracy, predictions)

    def gather_rng(self, rng: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The random states a checkpoint keeps: rank 0's at the top level (as one process saves them),
        and with several ranks every rank's, in rank order, under "ranks"."""
        if not self.distributed:
            return rng
        ranks: list[Any] = [None] * self.size
        dist.all_gather_object(ranks, rng)
        return {**rng, "ranks": ranks}

    def own_rng(self, rng: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This rank's random states from a checkpoint's (see gather_rng)."""
        return rng["ranks"][self.rank] if self.distributed else rng

    def create_run(self, path: Path, overwrite: bool) -> RunDirectory:
        """A new run at `path`, as rank 0 decides it (RunDirectory.create); the other ranks follow it.

        After torchrun restarts a failed job, the run it was making is reopened to resume
        from its last checkpoint, when it has one.
        """
        if self.restart and self._broadcast(self.rank == 0 and RunDirectory(path).has_checkpoints()):
            return self.open_run(path)
        if not self.distributed:
            return RunDirectory.create(path, overwrite)
        return self._follow_rank_zero(lambda: RunDirectory.create(path, overwrite), path)

    def open_run(self, path: Path) -> RunDirectory:
        """An existing run to resume (RunDirectory.open), opened by rank 0 alone and sent to the others:
        the run directory needs to be on rank 0's machine only."""
        if not self.distributed:
            return RunDirectory.open(path)
        return self._follow_rank_zero(lambda: RunDirectory.open(path), path)

    def _follow_rank_zero(self, make: Any, path: Path) -> RunDirectory:
        """Rank 0's run from `make`; on the others a FollowerRun with what rank 0 read to resume it."""
        run, sent = None, None
        if self.rank == 0:
            try:
                run = make()
                resumed = run.resume_checkpoint is not None
                sent = (
                    None,
                    run.resume_checkpoint,
                    run.read_metrics(),
                    run.load_checkpoint("best") if resumed else None,
                )
            except CnnlabError as exc:
                sent = (str(exc), None, [], None)
        error, checkpoint, rows, best = self._broadcast(sent)
        if error is not None:
            self.refuse(error)
        return run if self.rank == 0 else FollowerRun(path, checkpoint, rows, best)

    def _broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled: for the job's own small messages only)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


ONE_PROCESS = World()  # a run without torchrun, or a job of one process


def join() -> World:
    """This process's World: joins torchrun's job (from its environment) when there is one of several ranks.

    On ranks other than 0, stdout goes to /dev/null: rank 0 reports for the job. Errors
    and warnings still reach stderr from whichever rank meets them.
    """
    env = os.environ
    world = World(
        rank=int(env.get("RANK", 0)),
        size=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        restart=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        max_restarts=int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)),
    )
    if not world.distributed:
        return world
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        # torchrun's store outlives a restart, and the previous attempt's addresses in it would send
        # the new ranks to dead peers: each attempt keys its own under a prefix.
        store, _, _ = next(dist.rendezvous("env://", timeout=TIMEOUT))
        store = dist.PrefixStore(f"cnnlab/attempt-{world.restart}", store)
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return world


def launch_problem(config: TrainConfig, processes: int, local_processes: int, device: torch.device) -> str | None:
    """Why `processes` ranks (`local_processes` of them on this machine) cannot train `config`, or None."""
    if config.world_size != processes:
        return (
            f"the run was trained by {config.world_size} process(es) and this job has {processes}: its random "
            f"streams are per process, so continue it with {config.world_size} "
            f"(cnnlab train --nproc {config.world_size} --resume RUN)"
        )
    if device.type == "cuda":
        have, what = torch.cuda.device_count(), "GPU(s)"
    else:
        have, what = _cores(), "CPU core(s)"
    if local_processes > have:
        return f"{local_processes} processes on this machine, which has {have} {what}: use at most {have}"
    if config.batch_size % processes:
        return (
            f"--batch-size {config.batch_size} does not split evenly over {processes} processes: "
            f"choose a batch size that is a multiple of {processes}"
        )
    return None


def _cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _config_mismatch(config: TrainConfig) -> str | None:
    """How this job's ranks' options differ, or None when they all train the same run."""
    configs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(configs, config.to_dict())
    for rank, other in enumerate(configs):
        differing = sorted(key for key in configs[0].keys() | other.keys() if configs[0].get(key) != other.get(key))
        if differing:
            key = differing[0]
            return (
                f"rank {rank}'s options differ from rank 0's ({key}: {other.get(key)!r} there, {configs[0].get(key)!r} "
                "on rank 0): start every rank with the same command and config file"
            )
    return None


def _reduce_step(gradient: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gradient (P,), loss (): this rank's shares of the batch's -> their sums over the ranks, the batch's.

    One call for both. Every rank gets the same sums: the ring reduces each chunk once and
    then copies it, so the ranks' weights stay identical without a broadcast.
    """
    packed = torch.cat([gradient, loss.reshape(1).to(gradient.dtype)])  # (P + 1,)
    dist.all_reduce(packed)
    return packed[:-1], packed[-1]


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks, as a new tensor."""
    x = x.clone()
    dist.all_reduce(x)
    return x


def _backprop_layers(layer: Any) -> Any:
    """Every layer of a cnnlab.backprop network, containers' contents included."""
    yield layer
    for child in [*getattr(layer, "layers", ()), *(getattr(layer, name, None) for name in ("body", "shortcut"))]:
        if child is not None:
            yield from _backprop_layers(child)


class _AllReduce(torch.autograd.Function):
    """y = the sum over the ranks of x; so dL/dx on each rank is the sum over the ranks of dL/dy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(x)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(dy)


class _SyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are the global batch's (--sync-bn, autograd engine).

    Each rank's per-channel sums of x and its count, then of (x - mean)^2, are all-reduced (`_AllReduce`,
    whose backward all-reduces their gradients: the chain rule through the global mean and
    variance). torch's SyncBatchNorm takes GPU tensors only.
    x: (N, C, ...) -> the same shape. In evaluation, the running statistics, as always.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected a 2-d, 3-d or 4-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c, dims = self.num_features, (0, *range(2, x.dim()))
        per_channel = (1, c) + (1,) * (x.dim() - 2)
        # The mean first, then the squares about it, as var_mean: E[x^2] - mean^2 in float32 loses
        # the variance of channels whose mean is large beside it.
        totals = _AllReduce.apply(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // c)]))  # (C + 1,)
        m = totals[-1].detach()
        mu = totals[:c] / m
        var = _AllReduce.apply(((x - mu.view(per_channel)) ** 2).sum(dims)) / m
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mu, alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var * m / (m - 1), alpha=momentum)
        y = (x - mu.view(per_channel)) * torch.rsqrt(var + self.eps).view(per_channel)
        return y * self.weight.view(per_channel) + self.bias.view(per_channel) if self.affine else y


class FollowerRun(RunDirectory):
    """The run directory as a rank other than 0 sees it: it writes nothing.

    The checkpoint it would save as "best" stays in memory, for the test at the end;
    a resumed run's metrics come from rank 0.
    """

    writes = False

    def __init__(
        self,
        path: Path,
        resume_checkpoint: Checkpoint | None = None,
        rows: list | None = None,
        best: Checkpoint | None = None,
    ) -> None:
        super().__init__(path)
        self.resume_checkpoint = resume_checkpoint
        self._rows = rows or []
        self._best = best

    def prepare(self) -> None:
        pass

    def write_config(self, config: dict[str, Any]) -> None:
        pass

    def write_metrics(self, rows: list[dict[str, float]]) -> None:
        pass

    def read_metrics(self) -> list[dict[str, float]]:
        return list(self._rows)

    def save_checkpoint(self, kind: str, checkpoint: Checkpoint) -> Path:
        if kind == "best":
            self._best = _held(checkpoint)
        return self.checkpoints / f"{kind}.pt"

    def load_checkpoint(self, kind: str) -> Checkpoint:
        if kind != "best" or self._best is None:
            raise ValueError(f"a rank other than 0 keeps only the best checkpoint, not {kind!r}")
        return self._best

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        pass

    def write_text(self, name: str, text: str) -> None:
        pass


def _held(checkpoint: Checkpoint) -> Checkpoint:
    """A copy of the weights `checkpoint` holds, which training would otherwise go on changing in place."""
    return replace(
        checkpoint, model_state={k: v.detach().clone() for k, v in checkpoint.model_state.items()},
        optimizer_state=None, training_state=None, rng=None,
    )  # fmt: skip


def launch(processes: int, argv: list[str]) -> int:
    """Run `cnnlab argv` as a torchrun job of `processes` ranks on this machine; the job's exit status.

    torchrun's own reporting is kept quiet: the ranks say what went wrong (rank 0 for
    the job, any rank for its own failure), and the first failed rank's status is returned.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # What torchrun would pick (with a warning) for several processes on a CPU: their cores shared out.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // processes)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "cnnlab", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    return 0
