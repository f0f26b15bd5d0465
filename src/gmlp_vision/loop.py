"""The training loop's inner parts: one optimiser step, one epoch over the device-resident data, and stop requests.

An epoch is one permutation of the training images and a batch an index slice of it (`EpochProgress`, which a
checkpoint saves so that an interrupted epoch continues exactly); each step augments on the device (`augment`), runs
the model, and updates it. `train.train` runs the epochs around these.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gmlp_vision.augment import augment_for_training, mix_for_training, streams_crop, training_loss
from gmlp_vision.config import Config
from gmlp_vision.data.stream import ImageFiles
from gmlp_vision.distributed import SINGLE, Dist
from gmlp_vision.errors import NonFiniteLossError
from gmlp_vision.evaluate import compute_input, topk_correct
from gmlp_vision.images import resize
from gmlp_vision.optim import LrSchedule


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    *,
    weight: float | Tensor | None = None,
    cropped: bool = False,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on a uint8 batch: resize, augment, forward, loss, backward, update.

    The batch goes through in ``cfg.accum_steps`` micro-batches whose gradients add up (under DDP they are
    synchronised once, on the last). Each image's loss counts ``weight`` in the gradient: one float for all, or one
    per image (default ``1 / len(labels)``: the batch mean; the distributed loop passes ``world / global batch``, see
    `distributed`, and 0 for unreadable streamed files).

    Args:
        cropped: the images already are random-resized crops (streamed files); else ``cfg.crop`` is applied here.

    Returns:
        Every image's loss and the float32 logits, both detached.
    """
    n, device = len(labels), images.device
    weights = (
        weight.to(device)
        if isinstance(weight, Tensor)
        else torch.full((n,), 1.0 / n if weight is None else weight, device=device)
    )
    parts = min(cfg.accum_steps, n)
    ddp = _ddp(model)
    optimizer.zero_grad(set_to_none=True)
    losses, outputs = [], []
    for j, (xb, yb, wb) in enumerate(zip(*(t.tensor_split(parts) for t in (images, labels, weights)), strict=True)):
        with ddp.no_sync() if ddp is not None and j + 1 < parts else nullcontext():
            x = augment_for_training(resize(xb.float(), cfg.model.image_size), cfg, generator, cropped=cropped)
            x, targets = mix_for_training(x, yb, cfg, generator)
            logits = model(compute_input(x, cfg.precision)).float()
            loss = training_loss(logits, targets, cfg)
            (loss * wb).sum().backward()
        losses.append(loss.detach())
        outputs.append(logits.detach())
    if cfg.clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    optimizer.step()
    return (losses[0], outputs[0]) if parts == 1 else (torch.cat(losses), torch.cat(outputs))


def _ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of ``model`` (possibly inside a ``torch.compile`` wrapper), if any."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


@dataclass
class EpochProgress:
    """Where an epoch stands after some of its steps: enough to continue it exactly after a restart."""

    perm: Tensor  # this epoch's order of the training images (the same on every rank)
    batch: int = 0  # batches done in this epoch
    step: int = 0  # optimiser steps done in the whole run
    sums: dict[str, Tensor] = field(default_factory=dict)  # this rank's running loss / top-1 / top-5 sums

    def state_dict(self) -> dict[str, Any]:  # noqa: D102 (the sums are per rank: saved with each rank's RNG state)
        return {"perm": self.perm.cpu(), "batch": self.batch, "step": self.step}


METRICS = ("loss", "acc", "top5")


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    generator: torch.Generator,
    progress: tqdm | None = None,
    *,
    state: EpochProgress | None = None,
    ctx: Dist = SINGLE,
    stop_requested: Callable[[], bool] | None = None,
    after_step: Callable[[EpochProgress, bool], None] | None = None,
) -> dict[str, float]:
    """One pass over ``images`` (uint8, on the device) in shuffled batches; returns mean loss, top-1 and top-5.

    Under torchrun every rank passes the whole training set and the same permutation, trains on its share of each
    global batch (`Dist.share`), and gets metrics summed over all ranks.

    Args:
        state: continue a partly done epoch (its permutation, position and running sums) instead of starting one
            (default: a permutation drawn from ``generator``).
        stop_requested: polled after every step (default: never stop); under torchrun the ranks agree on it (every
            50 steps on GPUs).
        after_step: called after every step with the epoch's progress and whether to stop there.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (checked every step on CPU, every 50 on GPUs).
    """
    model.train()
    device, n = labels.device, len(labels)
    if state is None:
        state = EpochProgress(torch.randperm(n, generator=generator, device=generator.device).to(device))
    if not state.sums:
        state.sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in METRICS}
    sums, batches = state.sums, state.perm.split(cfg.batch_size)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 50  # .item() and collectives sync the device: not every step on GPUs
    plan = []
    for i in range(state.batch, len(batches)):
        mine, weight = ctx.share(batches[i]), ctx.world / len(batches[i])
        if not len(mine):  # a last batch smaller than the world: this rank takes part with a zero-weight image
            mine, weight = batches[i][:1], 0.0
        plan.append((i, mine, weight))
    fetched = _fetch(images, [mine for _, mine, _ in plan], cfg, state.step)
    schedule = LrSchedule.from_config(cfg, len(batches))
    for (i, mine, weight), (x, readable) in zip(plan, fetched, strict=True):
        schedule.apply(optimizer, state.step)
        y = labels[mine]
        weights = torch.full((len(mine),), weight, device=device)
        if readable is not None:
            weights *= readable  # an unreadable streamed file (--skip-bad-images) counts for nothing
        cropped = readable is not None and streams_crop(cfg)
        losses, logits = train_step(model, optimizer, x, y, cfg, generator, weight=weights, cropped=cropped)
        state.batch, state.step = i + 1, state.step + 1
        loss = losses.sum() if readable is None else (losses * readable).sum()
        if weight:
            with torch.no_grad():
                nonfinite |= ~torch.isfinite(loss)
                c1, c5 = topk_correct(logits, y, readable)
                sums["loss"] += loss
                sums["acc"] += c1
                sums["top5"] += c5
        check = state.step % check_every == 0 or i + 1 == len(batches)
        stop = stop_requested is not None and stop_requested()
        if ctx.enabled:
            bad, stop = ctx.any(nonfinite, stop) if check else (False, False)
        else:
            bad = check and bool(nonfinite.item())
        if bad:
            value = loss.item() if nonfinite.item() else "non-finite on another rank"
            where = f"step {state.step}" if check_every == 1 else f"one of the steps up to {state.step}"
            raise NonFiniteLossError(f"the training loss became {value} at {where} (epoch batch {i + 1})")
        if progress is not None:
            progress.update(1)
        if after_step is not None:
            after_step(state, stop)
    totals = ctx.sum(torch.stack([sums[k] for k in METRICS]))
    return {k: v / n for k, v in zip(METRICS, totals.tolist(), strict=True)}


def _fetch(
    images: Tensor | ImageFiles, shares: list[Tensor], cfg: Config, first_step: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Each share's uint8 images on the training device, and for streamed files which ones could be read.

    Streamed files are decoded ahead by worker processes, as random-resized crops when ``cfg.crop`` asks for them,
    each keyed to (seed, step, image index) so that resuming, or another number of workers, draws the same crops.
    """
    if isinstance(images, Tensor):
        yield from ((images[mine], None) for mine in shares)
        return
    keys = None
    if streams_crop(cfg):
        keys = [[(cfg.seed * 1_000_003 + first_step + n) << 32 | int(i) for i in mine] for n, mine in enumerate(shares)]
    device = shares[0].device if shares else torch.device("cpu")
    for x, readable in images.batches([mine.tolist() for mine in shares], keys):
        yield x.to(device, non_blocking=True), readable.to(device)


class StopRequests:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum

    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    @contextmanager
    def installed(self) -> Iterator[StopRequests]:
        """Install the handlers for the duration of the block (only possible in the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
