"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``: a process per device, any number of nodes.

We add no communication layer of our own: ``torchrun`` starts the processes and sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, `distributed` joins its process group (NCCL on CUDA, Gloo on CPU) for the run, DDP averages the
gradients, and `runtime.Dist` holds the few collectives the training loop needs. `maybe_compile` applies
``--compile``. Without ``torchrun`` the same code runs as one process with a `runtime.Dist` whose collectives do
nothing.

How a batch is split: ``--batch-size`` is the global batch. Every rank draws the same per-epoch permutation and takes
its contiguous part of each global batch (`runtime.Dist.share`: sizes differ by at most one, the first ranks get the
extra image, so a last partial batch is split the same way). Each rank's loss is its sum over its images times
``world / global_batch``, so DDP's average of the ranks' gradients is exactly the gradient of the global batch's mean
loss, whatever the split. A rank whose share of a tiny last batch is empty takes part with a zero-weight image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

import gmlp_vision.fused as fused  # the module, not the package: no import cycle through __init__
from gmlp_vision.errors import ConfigError
from gmlp_vision.runtime import Dist, launched, resolve_device


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


def maybe_compile(model: nn.Module, compile: bool) -> nn.Module:
    """``torch.compile(model)`` with ``--compile``; checkpoints always save the unwrapped module.

    The fused CPU kernels are loaded first, so the compiled graph calls them (`fused.applies`).
    """
    if not compile:
        return model
    fused.library()
    return torch.compile(model)
