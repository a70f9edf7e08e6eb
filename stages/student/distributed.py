"""Data parallelism for stage two: the process group, who does what, and the launcher.

`torchrun --nproc-per-node N -m pipeline train ...` (or `pipeline train --nproc N`, which
starts the same through torch's elastic launcher) runs one process per device. Each joins
the process group here (NCCL on CUDA, gloo on CPU), trains on its slice of every global
batch under DistributedDataParallel, and scores its shard of the validation samples; the
confusion matrices are summed across ranks. Only rank 0 writes checkpoints, dvclive and
the progress bar. A single process is the world of size 1: every helper is then a no-op.

The losses are written so that the global batch, not a rank's slice, is the unit: a
batch-level sum goes through `World.total`, whose value is the sum over all ranks and
whose gradient flows into this rank's own share only; each rank back-propagates
`world.size * loss` and DDP averages, which gives exactly the gradient of the loss over
the whole batch. BatchNorm statistics are summed across ranks the same way
(`sync_batchnorm`), so N ranks x batch B/N train as one process with batch B.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from any2seg.errors import PipelineError, ReportedError
from any2seg.precision import stable_dtype

log = logging.getLogger("pipeline.distributed")


def launched() -> bool:
    """Whether this process is one rank of a torchrun / `--nproc` launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size`, computing on `device`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def split(self, batch_size: int) -> int:
        """This rank's share of a global batch; refuses one that does not divide."""
        if batch_size % self.size:
            raise PipelineError(
                f"train.batch_size {batch_size} does not divide over {self.size} ranks; "
                f"use a multiple of {self.size} (the batch is the global batch, split "
                "across ranks)")
        return batch_size // self.size

    def shard(self, n: int) -> list[int]:
        """Indices 0..n-1 that this rank scores (every size-th, from its rank)."""
        return list(range(self.rank, n, self.size))

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over all ranks, differentiable in this rank's `x` only (the other
        ranks' shares are constants here; their gradients are taken on their ranks)."""
        if self.size == 1:
            return x
        others = x.detach().clone()
        dist.all_reduce(others)
        if not x.is_floating_point():
            return others
        return x + (others - x.detach())

    def sum_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Element-wise sums over ranks of int64 arrays (confusion matrices), exact."""
        if self.size == 1:
            return list(arrays)
        flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.int64))
        flat = flat.to(self.device if self.device.startswith("cuda") else "cpu")
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        out, at = [], 0
        for a in arrays:
            out.append(flat[at:at + a.size].reshape(a.shape))
            at += a.size
        return out

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's `items` concatenated in rank order (small Python objects)."""
        if self.size == 1:
            return list(items)
        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def average_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """DDP's gradient averaging for parameters outside the DDP module (CodeAlign's
        translators, called several times a step, which DDP's reducer does not allow). A
        parameter no rank used keeps no gradient, as in one process (AdamW skips it)."""
        if self.size == 1:
            return
        params = list(params)
        if not params:
            return
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int64,
                            device=params[0].device)  # NCCL reduces device tensors only
        dist.all_reduce(used)
        for p, n in zip(params, used.tolist(), strict=True):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


_LAUNCHER_PID = "ANY2SEG_LAUNCHER_PID"  # set by `launch` for the ranks it starts


def _die_with_launcher() -> None:
    """Under `--nproc`, end this rank when the launcher dies, even by SIGKILL: torch's
    agent starts ranks in sessions of their own, so they would otherwise train on, orphaned
    (Linux; elsewhere a no-op)."""
    parent = os.environ.get(_LAUNCHER_PID)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the launcher died before the line above
        os._exit(1)


def join(device: str) -> World:
    """The world this process belongs to, joining the process group torchrun (or `--nproc`)
    started: NCCL with one GPU per rank on CUDA, gloo on CPU. One process: size 1."""
    if not launched():
        return World(device=device)
    _die_with_launcher()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(f"rank {rank} needs GPU {local_rank} but this node has "
                                f"{torch.cuda.device_count()}; start at most that many "
                                "processes per node")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores, do not oversubscribe them
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size,
                                device_id=torch.device(device) if backend == "nccl" else None)
    return World(rank, size, local_rank, device)


def leave() -> None:
    """Tear the process group down (end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# the model under DDP
# ---------------------------------------------------------------------------------------
class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(sum) whose backward is all_reduce(sum) of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised BatchNorm for CPU ranks (gloo): torch's SyncBatchNorm has GPU kernels
    only, and DDP refuses it on CPU modules.

    The batch statistics come from sums all-reduced with gradient (the mean first, then
    the centred second moment, in the stable dtype): what one process computes over the
    whole batch. Running statistics are updated as `F.batch_norm` updates them."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        work = x.to(stable_dtype(x.dtype))
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=work.dtype)
        dist.all_reduce(count)
        mean = _SumAcrossRanks.apply(work.sum(dims)) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = work - mean.view(shape)
        var = _SumAcrossRanks.apply((centred * centred).sum(dims)) / count
        if self.track_running_stats and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased * momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: str) -> nn.Module:
    """Every BatchNorm layer synchronised across ranks, parameters and buffers kept (MiT
    has none; the SegFormer head's fuse layer and BN backbones such as timm ResNets do):
    torch's SyncBatchNorm on CUDA, `GlooBatchNorm` on CPU."""
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(module, GlooBatchNorm):
        sync = GlooBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        if module.affine:  # the same Parameter objects: an optimizer built before holds them
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean = module.running_mean
            sync.running_var = module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child, device))
    return module


def parallel(model: nn.Module, world: World, compile_model: bool = False) -> nn.Module:
    """The module the training loop calls: `model` with synchronised BatchNorm under DDP
    when there are several ranks, compiled when asked (DDP first, as torch recommends).
    `model` itself stays the plain module to save and evaluate."""
    net: nn.Module = model
    # a depthwise kernel's gradient comes with another (meaningless) stride on its size-1
    # axis than DDP's bucket view; DDP copies it and warns once per rank
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    if world.size > 1:
        model = sync_batchnorm(model, world.device)
        ids = [world.local_rank] if world.device.startswith("cuda") else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compile_model:
        net = torch.compile(net)
    return net


class NullLive:
    """dvclive's interface doing nothing: what ranks other than 0 log to."""

    step = 0

    def log_metric(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        pass

    def next_step(self) -> None:
        pass

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# errors: shown once
# ---------------------------------------------------------------------------------------
def first_to_fail() -> bool:
    """Whether this rank is the first of the job to fail (always True in one process).

    A failing rank ends the job (the launcher stops the others), and the others often
    fail in the same way at the same moment, or with a broken connection to the one that
    failed. The first one to count itself on the launcher's key-value store reports the
    error; the others exit quietly."""
    if not launched():
        return True
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=datetime.timedelta(seconds=5))
        key = (f"any2seg/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
               f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/failed")
        return store.add(key, 1) == 1
    except Exception:  # noqa: BLE001 - no store (the job is going down): report anyway
        return True


def launch(nproc: int, argv: list[str], device: str, debug: bool = False) -> None:
    """Run `python -m pipeline ARGV` as `nproc` ranks on this machine through torch's
    elastic launcher (what `torchrun --standalone --nproc-per-node N` does); returns when
    all succeeded, raises PipelineError (already reported by the failing rank) otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if device.startswith("cuda") and nproc > torch.cuda.device_count():
        raise PipelineError(f"--nproc {nproc} needs {nproc} GPUs but this machine has "
                            f"{torch.cuda.device_count()}")
    if not debug:  # the failing rank prints its own error; the agent's log would repeat it
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    os.environ[_LAUNCHER_PID] = str(os.getpid())  # the ranks inherit it
    try:
        elastic_launch(config, sys.executable)("-m", "pipeline", *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: nothing was printed
            raise PipelineError(f"rank {rank} was killed by {failure.signal_name()} "
                                "(out of memory?); the job stopped") from None
        raise ReportedError(failure.exitcode) from None  # the rank printed why
    finally:
        os.environ.pop(_LAUNCHER_PID, None)
