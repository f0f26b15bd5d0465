"""Where the code runs, for training and inference alike: the device, this process's place in a job, plain modules.

`resolve_device` turns ``--device`` into a ``torch.device``. Under ``torchrun`` (which sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``) every process learns its place with `launched`, and `Dist` holds the few collectives the code needs:
sums of metrics, agreement on stopping, rank 0 doing the I/O, and `Dist.share`, a rank's contiguous part of a global
batch (sizes differ by at most one, the first ranks get the extra image). Without ``torchrun`` the same code runs as
one process with `SINGLE`, whose collectives do nothing. `unwrap` finds the plain module inside the DDP and
``torch.compile`` wrappers. Joining the process group is training's part (`distributed`); how many CPU threads torch
runs with is `cpu`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
