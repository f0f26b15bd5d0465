"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``: a process per device, any number of nodes.

We add no communication layer of our own: ``torchrun`` starts the processes and sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, `distributed` joins its process group (NCCL on CUDA, Gloo on CPU), DDP averages the gradients, and
`Dist` holds the few collectives the training loop needs (sums of metrics, agreement on stopping, rank 0 doing the I/O).
Without ``torchrun`` the same code runs as one process with a `Dist` whose collectives do nothing.

How a batch is split: ``--batch-size`` is the global batch. Every rank draws the same per-epoch permutation and takes
its contiguous part of each global batch (`Dist.share`: sizes differ by at most one, the first ranks get the extra
image, so a last partial batch is split the same way). Each rank's loss is its sum over its images times
``world / global_batch``, so DDP's average of the ranks' gradients is exactly the gradient of the global batch's mean
loss, whatever the split. A rank whose share of a tiny last batch is empty takes part with a zero-weight image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

import gmlp_vision.fused as fused  # the module, not the package: no import cycle through __init__
from gmlp_vision.config.checks import check_device
from gmlp_vision.errors import ConfigError, GmlpError

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        ConfigError: not auto, cpu, cuda or cuda:N, or CUDA asked for where there is none.
    """
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the default is the single-process job, where every collective is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def share(self, items: Tensor) -> Tensor:
        """This rank's contiguous part of a global batch (sizes differ by at most one; the first ranks get more)."""
        return items.tensor_split(self.world)[self.rank] if self.enabled else items

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over all ranks (in place)."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def any(self, *flags: Tensor | bool) -> list[bool]:
        """For each flag, whether it is set on any rank: one collective, the same answer everywhere."""
        values = torch.stack([torch.as_tensor(f, dtype=torch.float32).reshape(()).cpu() for f in flags])
        if self.enabled:
            values = values.to(_collective_device())
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def on_main(self, fn: Callable[[], T], *, share: bool = True) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank; an error it raises is raised on every rank.

        With ``share=False`` only the error travels, and the other ranks get None.
        """
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        result: Any = None
        if self.main:
            try:
                result = fn()
                box = [("ok", result if share else None)]
            except GmlpError as e:
                box = [("error", e)]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return result if self.main else value

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then on the others, which then find what rank 0 downloaded or cached.

        An error raised on rank 0 is raised on every rank without the others running ``fn``.
        """
        if not self.enabled:
            return fn()
        result = self.on_main(fn, share=False)  # rank 0's result (a whole dataset) is not sent: each loads its own
        return result if self.main else fn()


SINGLE = Dist()  # the single-process job


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> Dist:
    """The place ``torchrun`` (or any launcher setting its variables) gave this process; `Dist()` when none."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return Dist(rank, world, local_rank) if world > 1 else Dist()


@contextmanager
def distributed(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """This process's `Dist` and training device, inside the job's process group for the duration of the block.

    Under ``torchrun`` each process trains on ``cuda:LOCAL_RANK`` with NCCL when CUDA is used, else on the CPU with
    Gloo. The group is joined here unless the caller already did (then it is left to the caller to close).

    Raises:
        ConfigError: an explicit ``cuda:N`` under torchrun (each rank's device is its local rank), or no CUDA.
    """
    place = launched()
    if not place.enabled:
        yield place, resolve_device(device_name)
        return
    if device_name.startswith("cuda:"):
        raise ConfigError(f"--device {device_name}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), place.local_rank), device
        if joined:  # all ranks finished: none tears its connections down while another still talks (rank 1 could
            dist.barrier()  # abort at exit, "terminate called without an active exception", in ~1 run of 6)
    finally:
        if joined:
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def maybe_compile(model: nn.Module, compile: bool) -> nn.Module:
    """``torch.compile(model)`` with ``--compile``; checkpoints always save the unwrapped module.

    The fused CPU kernels are loaded first, so the compiled graph calls them (`fused.applies`).
    """
    if not compile:
        return model
    fused.library()
    return torch.compile(model)
