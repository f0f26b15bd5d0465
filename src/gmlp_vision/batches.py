"""The training set as the steps see it: the images on the device, the epoch's order, the shares, the gather.

An epoch is one ``randperm`` of the training images (`BatchSource.new_epoch`, the same on every rank: it is drawn from
the run's order generator) and a batch an index slice of it. Under torchrun every rank holds the whole set and trains
on its contiguous share of each global batch (`runtime.Dist.share`); a rank left without an image in a small last
batch takes part with one image of weight 0. `BatchSource.batches` hands each step its `Batch`: the indices, the weight
of each image in the gradient, and the uint8 pixels and labels, gathered from the device-resident set by
`BatchSource.gather` or decoded from streamed files by worker processes, and mirrored there under
``--flip-mode alternate`` (each image's mirror follows its index and the epoch: `alternating_flips`). A
captured CUDA step (`graphs.GraphStep`) takes the indices alone and calls `BatchSource.gather` inside its graph.

Streamed files are decoded ahead, as random-resized crops when ``--crop`` asks for them, each crop keyed to (seed,
step, image index) so that resuming, or another number of workers, draws the same crops. `EpochProgress` is where an
epoch stands, which a checkpoint saves so that an interrupted epoch continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gmlp_vision.data.stream import ImageFiles
from gmlp_vision.runtime import SINGLE, Dist

CROP_KEY_STRIDE = 1_000_003  # a streamed crop's key: (seed * stride + step) << 32 | image index


def flip_halves(n: int, seed: int) -> Tensor:
    """`--flip-mode alternate`'s random half of ``n`` training images (those mirrored in even epochs), from ``seed``."""
    own = (seed * 1_000_003 + 0x5EED_F11B) % 2**63  # not the seed of the epochs' order: an independent draw
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(own)).bool()


def alternating_flips(halves: Tensor, index: Tensor, epoch: int) -> Tensor:
    """Which images of ``index`` (training-set indices) `--flip-mode alternate` mirrors in ``epoch`` (0-based).

    Each image is mirrored in every other epoch: the first epoch mirrors a random half of the set (``halves``, from
    `flip_halves`), the next the other half, and so on (airbench's alternating flip), so any two epochs in a row show
    every image both ways. Stateless: a resumed run, or another number of ranks, mirrors exactly as an uninterrupted
    run would. A balanced sampler that draws an image twice in an epoch shows it mirrored the same way both times.
    """
    return halves[index] ^ bool(epoch % 2)


@dataclass
class EpochProgress:
    """Where an epoch stands after some of its steps: enough to continue it exactly after a restart."""

    perm: Tensor  # this epoch's order of the training images (the same on every rank)
    batch: int = 0  # batches done in this epoch
    step: int = 0  # optimiser steps done in the whole run
    sums: dict[str, Tensor] = field(default_factory=dict)  # this rank's running loss / top-1 / top-5 sums

    def state_dict(self) -> dict[str, Any]:  # noqa: D102 (the sums are per rank: saved with each rank's RNG state)
        return {"perm": self.perm.cpu(), "batch": self.batch, "step": self.step}


@dataclass(frozen=True)
class Batch:
    """One optimiser step's images for this process.

    ``number``: the batch's place in the epoch (0-based). ``index``: this process's share of it, indices into the
    training set, on the device. ``weight``: what each image's loss counts in the gradient (``world / global batch``;
    0 for a stand-in image). ``images``/``labels``: the gathered or decoded uint8 pixels and their labels (None where
    the step gathers them itself). ``readable``: streamed files only, which of them could be read (an unreadable file,
    with ``--skip-bad-images``, counts for nothing). ``cropped``: the images already are random-resized crops.
    """

    number: int
    index: Tensor
    weight: float
    images: Tensor | None = None
    labels: Tensor | None = None
    readable: Tensor | None = None
    cropped: bool = False
    class_weights: Tensor | None = None  # --class-weights balanced: each class's loss weight, on the device

    def weights(self) -> Tensor:
        """Each image's weight in the gradient: ``weight``, times its class's weight, times 0 for an unreadable file."""
        assert self.labels is not None
        weights = torch.full((len(self.labels),), self.weight, device=self.labels.device)
        if self.class_weights is not None:
            weights *= self.class_weights[self.labels]
        if self.readable is not None:
            weights *= self.readable
        return weights


class BatchSource:
    """A run's training images (uint8 on the device, or streamed files) and their labels, cut into batches.

    Args:
        images: the training images: a uint8 tensor on the training device, or `data.stream.ImageFiles`.
        labels: their labels, on the training device.
        batch_size: images per global batch (the last one of an epoch may hold fewer).
        ctx: this process's place under torchrun (default: a single process).
        crop_seed: streamed files are decoded as random-resized crops keyed to this seed (`augment.streams_crop`
            says when); None: whole images. Images in memory ignore it (the step crops them).
        flip_seed: the batches come mirrored as `alternating_flips` says for this seed
            (`augment.alternates_flips` says when); None: as they are (the step flips them at random, or not at all).
        class_weights: ``balanced``: each image's loss counts n / (classes x images of its class) (`class_weights`).
        sampler: ``balanced``: an epoch draws as many images, with replacement, each class equally likely.
    """

    def __init__(
        self,
        images: Tensor | ImageFiles,
        labels: Tensor,
        batch_size: int,
        *,
        ctx: Dist = SINGLE,
        crop_seed: int | None = None,
        flip_seed: int | None = None,
        class_weights: str = "none",
        sampler: str = "shuffle",
    ) -> None:
        self.images, self.labels, self.batch_size, self.ctx = images, labels, batch_size, ctx
        counts = torch.bincount(labels.cpu()).double()
        balanced = (len(labels) / (int((counts > 0).sum()) * counts.clamp_min(1))).float()
        self.class_weights = balanced.to(labels.device) if class_weights == "balanced" else None
        self.draw_weights = (1.0 / counts.clamp_min(1))[labels.cpu()] if sampler == "balanced" else None
        self.streamed = isinstance(images, ImageFiles)
        self.seed = crop_seed
        self.halves = None if flip_seed is None else flip_halves(len(labels), flip_seed).to(labels.device)
        self.crops = self.streamed and crop_seed is not None  # decoded as crops: the step does not crop them again

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        """The training device."""
        return self.labels.device

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in an epoch: the last batch may be smaller."""
        return math.ceil(len(self) / self.batch_size)

    def new_epoch(self, order: torch.Generator, step: int) -> EpochProgress:
        """A new epoch's order, drawn from ``order`` (the same on every rank), starting at optimiser step ``step``.

        A permutation; with the balanced sampler, as many indices drawn with replacement, each class equally likely.
        """
        if self.draw_weights is not None:
            drawn = torch.multinomial(self.draw_weights, len(self), replacement=True, generator=order)
            return EpochProgress(drawn.to(self.device), step=step)
        return EpochProgress(torch.randperm(len(self), generator=order).to(self.device), step=step)

    def gather(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The uint8 images and labels at ``index`` (on the device) of a set held in memory."""
        assert isinstance(self.images, Tensor), "streamed files are decoded by `batches`, not gathered"
        return self.images[index], self.labels[index]

    def batches(self, progress: EpochProgress, *, gather: bool = True) -> Iterator[Batch]:
        """The rest of ``progress``'s epoch, batch by batch: this process's share of each, gathered or decoded.

        Args:
            gather: False: the batches carry their indices only (a captured step gathers inside its graph).

        Raises:
            DataError: an unreadable streamed file (without ``--skip-bad-images``).
        """
        plan = self._plan(progress)
        epoch = (progress.step - progress.batch) // self.steps_per_epoch
        if not gather:
            if self.halves is not None:
                raise ValueError("a captured step would gather unmirrored images (`graphs.unsupported` says so)")
            yield from (Batch(number, mine, weight, class_weights=self.class_weights) for number, mine, weight in plan)
        elif not self.streamed:
            for number, mine, weight in plan:
                x, y = self.gather(mine)
                yield Batch(number, mine, weight, self._mirrored(x, mine, epoch), y, class_weights=self.class_weights)
        else:
            decoded = self._decode([mine for _, mine, _ in plan], progress.step)
            for (number, mine, weight), (x, readable) in zip(plan, decoded, strict=True):
                x = self._mirrored(x, mine, epoch)
                yield Batch(number, mine, weight, x, self.labels[mine], readable, self.crops, self.class_weights)

    def _mirrored(self, images: Tensor, index: Tensor, epoch: int) -> Tensor:
        """``images`` (at ``index``) as ``epoch`` shows them: mirrored as `alternating_flips` says."""
        if self.halves is None:
            return images
        flips = alternating_flips(self.halves, index, epoch)
        return torch.where(flips[:, None, None, None], images.flip(-1), images)

    def _plan(self, progress: EpochProgress) -> list[tuple[int, Tensor, float]]:
        """The epoch's steps from batch ``progress.batch`` on: (number, this rank's share, each image's weight)."""
        batches, ctx = progress.perm.split(self.batch_size), self.ctx
        plan = []
        for number in range(progress.batch, len(batches)):
            mine, weight = ctx.share(batches[number]), ctx.world / len(batches[number])
            if not len(mine):  # a last batch smaller than the world: this rank takes part with a zero-weight image
                mine, weight = batches[number][:1], 0.0
            plan.append((number, mine, weight))
        return plan

    def _decode(self, shares: list[Tensor], first_step: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Each share's streamed files decoded on the device, and which could be read (workers decode ahead)."""
        assert isinstance(self.images, ImageFiles)
        keys = None
        if self.crops and self.seed is not None:
            keys = [
                [(self.seed * CROP_KEY_STRIDE + first_step + n) << 32 | int(i) for i in mine]
                for n, mine in enumerate(shares)
            ]
        for x, readable in self.images.batches([mine.tolist() for mine in shares], keys):
            yield x.to(self.device, non_blocking=True), readable.to(self.device)
