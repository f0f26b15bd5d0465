"""The whole training step as one CUDA graph: gather, augmentation, forward, backward, update and metrics, replayed.

At the `seed` model's batch of 128 a step is a few hundred small kernels, and on a GPU their launches, not their
arithmetic, set the pace. `GraphStep` captures everything a step does on the device once per batch size (the epoch's
last, partial batch gets a graph of its own, sharing the memory pool) and then replays it. Per step the host copies
the batch's indices in, sets three scalars per parameter group (`optim.adamw_scalars`: the lr and the bias
corrections) and launches the graph: the gather from the training set, the random draws, the optimiser update
(`optim.adamw_apply`), the metrics and the non-finite flag all happen inside it, with no host synchronisation.

Random numbers: the run's augmentation generator is registered with each graph and dropout draws from torch's default
CUDA generator, which graphs track themselves, so replays draw what the eager step would. Warm-up and capture run real
steps; the weights, the optimiser's state and every random stream are put back afterwards, so a run's numbers do not
depend on when a graph was captured and resuming stays exact. `unsupported` is the one place that decides whether the
step can be captured at all.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gmlp_vision.augment import alternates_flips
from gmlp_vision.batches import Batch, BatchSource
from gmlp_vision.config.core import Config
from gmlp_vision.errors import ConfigError, first_line
from gmlp_vision.metrics import METRICS, add_metrics
from gmlp_vision.optim import ADAMW_SCALARS, adamw_apply, adamw_scalars, init_adamw_state
from gmlp_vision.precision import precision_named
from gmlp_vision.step import backward_step

# Eager steps run before a capture: lazy initialisation (cuBLAS workspaces, the first gradients, torch.compile's
# compilation and autotuning) must not happen inside it.
WARMUP_STEPS = 3


def unsupported(cfg: Config, device: torch.device, *, distributed: bool, streamed: bool) -> str | None:
    """Why a run's training step cannot be captured as a CUDA graph; None when it can."""
    aug, not_capturable = cfg.augment, precision_named(cfg.run.precision).not_capturable
    reasons = (
        (device.type != "cuda", "not on a CUDA device"),
        (not cfg.run.cuda_graphs, "--no-cuda-graphs"),
        (distributed, "torchrun (DDP synchronises the gradients from its own hooks)"),
        (streamed, "the images are streamed from files (each batch is decoded on the host)"),
        (bool(not_capturable), not_capturable),
        (bool(aug.mixup or aug.cutmix), "mixup/cutmix (each batch's mixing share is drawn on the host)"),
        (aug.policy != "none", f"--policy {aug.policy} (each op picks its images on the host)"),
        (alternates_flips(aug), "--flip-mode alternate (the batch source mirrors the images as it gathers them)"),
        (cfg.optim.optimizer not in ("keras-adamw", "adamw"), f"--optimizer {cfg.optim.optimizer}"),
        (not captures_generators(), f"torch {torch.__version__} cannot capture the augmentation's own generator"),
    )
    return next((why for bad, why in reasons if bad), None)


def captures_generators() -> bool:
    """Whether this torch's CUDA graphs take random generators besides the default one (torch 2.5 and later)."""
    return hasattr(torch.cuda.CUDAGraph, "register_generator_state")


@dataclass
class _Captured:
    """One batch size's graph: its index buffer (the input), what it returns, and the gradients it writes.

    The graphs share one memory pool: what one graph only uses within a replay (activations, and the gradients of the
    graph captured before it, which ``p.grad`` no longer names) may be overwritten by the next replay of another.
    Outputs are read right after their replay, in stream order, and nothing else carries over.
    """

    index: Tensor
    graph: Any = None  # torch.cuda.CUDAGraph; None: the step runs eagerly (`GraphStep.capture` False)
    out: tuple[Tensor, Tensor] | None = None  # every image's loss, and their sum
    grads: list[Tensor | None] = field(default_factory=list)  # kept alive so that no other graph reuses them


class GraphStep:
    """A run's training step, captured once per batch size and replayed (`unsupported` says when it applies).

    A `step.Stepper`: it takes batches of indices alone (``gathers``) and gathers their images inside the graph, from
    the training set its `batches.BatchSource` holds on the device.

    Args:
        wrapped: the model as training runs it (possibly compiled).
        model: the model itself (its parameters).
        optimizer: ``KerasAdamW`` or ``torch.optim.AdamW``; its state is created now (`optim.init_adamw_state`).
        cfg: the run's config (augmentation, loss, clipping).
        generator: the augmentation's random stream.
        source: the training set, uint8 images and labels on the device; a step gathers its batch from it.
        capture: False runs the same step without a graph (on a CPU, for tests): every host-side part is the same.
    """

    gathers = True

    def __init__(
        self,
        wrapped: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        generator: torch.Generator,
        source: BatchSource,
        *,
        capture: bool = True,
    ) -> None:
        self.wrapped, self.model, self.optimizer, self.cfg, self.generator = wrapped, model, optimizer, cfg, generator
        self.source, self.capture = source, capture
        device = source.device
        init_adamw_state(optimizer)
        self.scalars = torch.zeros(len(optimizer.param_groups), ADAMW_SCALARS, device=device)
        self._written: list[tuple[float, ...]] = [(0.0,) * ADAMW_SCALARS] * len(optimizer.param_groups)
        self.sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)
        self.views = {k: self.sums[i] for i, k in enumerate(METRICS)}  # what `EpochProgress.sums` becomes
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._graphs: dict[int, _Captured] = {}
        self._pool: Any = None

    def begin_epoch(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Carry an epoch's running ``sums`` on in this step's buffers; returns the views that replace them."""
        self.nonfinite.zero_()
        for i, k in enumerate(METRICS):
            self.sums[i] = sums[k] if sums else 0.0
        return self.views

    def step(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """One optimiser step on the training images ``batch.index``; returns the losses and their sum."""
        self._set_scalars(adamw_scalars(self.optimizer))  # before a warm-up, so that it runs with this step's values
        captured = self._graphs.get(len(batch.index)) or self._prepare(len(batch.index))
        captured.index.copy_(batch.index)
        if captured.graph is None:
            return self._body(captured.index)
        captured.graph.replay()
        assert captured.out is not None
        return captured.out

    def _set_scalars(self, rows: list[tuple[float, float, float]]) -> None:
        """Write the update's scalars that changed since the last step (a fill each: no host synchronisation)."""
        for g, (row, old) in enumerate(zip(rows, self._written, strict=True)):
            for k, (value, before) in enumerate(zip(row, old, strict=True)):
                if value != before:
                    self.scalars[g, k].fill_(value)
        self._written = [tuple(row) for row in rows]

    def _body(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The step itself, as captured: gather, augment, forward, backward, clip, update, add the metrics."""
        x, y = self.source.gather(index)
        self.optimizer.zero_grad(set_to_none=True)  # host-side only: inside a capture the gradients are None already
        balanced = self.source.class_weights  # --class-weights balanced, else each image 1 / n as ever
        weights = None if balanced is None else balanced[y] / len(y)
        losses, logits = backward_step(self.wrapped, x, y, self.cfg, self.generator, weights=weights)
        if self.cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        adamw_apply(self.optimizer, self.scalars)
        return losses, add_metrics(self.views, self.nonfinite, losses, logits, y, None)

    def _prepare(self, n: int) -> _Captured:
        """Warm up and capture the step for batches of ``n`` images, then put every state back as it was."""
        device = self.source.device
        captured = _Captured(torch.arange(n, device=device) % len(self.source))
        saved = _Snapshot.take(self.model, self.optimizer, self.generator, self.sums, self.nonfinite)
        # Streams, captures and the default generator are those of the current device: make it the data's (cuda:N).
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            try:
                self._warm_up(captured.index)
                if self.capture:
                    self._capture(captured)
            finally:
                saved.restore()
        self._graphs[n] = captured
        return captured

    def _warm_up(self, index: Tensor) -> None:
        """Run the step eagerly a few times (on a side stream on a GPU, as captures want)."""
        side = torch.cuda.Stream() if index.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for _ in range(WARMUP_STEPS):
                self._body(index)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)

    def _capture(self, captured: _Captured) -> None:
        """Record the step into a new graph (sharing the memory pool of the others); its outputs are kept."""
        params = list(self.model.parameters())
        self.optimizer.zero_grad(set_to_none=True)  # the graph writes its own gradients
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                captured.out = self._body(captured.index)
        except RuntimeError as e:  # torch's CUDA errors; the device's random state may not be usable after one
            raise ConfigError(
                f"the training step could not be captured as a CUDA graph ({first_line(e)}); "
                "train with --no-cuda-graphs"
            ) from e
        self._pool = graph.pool()
        captured.graph, captured.grads = graph, [p.grad for p in params]


@dataclass
class _Snapshot:
    """Weights, optimiser state, random streams and metric buffers at one moment, to put back in place."""

    tensors: list[tuple[Tensor, Tensor]]  # (live tensor, its saved copy): restored in place, graphs keep pointing
    counts: list[tuple[dict[str, Any], Any]]  # host-side optimiser step counts
    generator: torch.Generator
    streams: tuple[Tensor, Tensor, Tensor | None]  # the generator's, torch's CPU and CUDA default states

    @classmethod
    def take(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        *buffers: Tensor,
    ) -> _Snapshot:
        live = [p.data for p in model.parameters()] + list(buffers)
        counts = []
        for s in optimizer.state.values():
            live += [v for k, v in s.items() if isinstance(v, Tensor) and k != "step"]
            counts.append((s, s["step"].clone() if isinstance(s["step"], Tensor) else s["step"]))
        device = generator.device
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        streams = (generator.get_state(), torch.get_rng_state(), cuda)
        return cls([(t, t.detach().clone()) for t in live], counts, generator, streams)

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.tensors:
            live.copy_(saved)
        for s, step in self.counts:
            s["step"] = step
        self.generator.set_state(self.streams[0])
        torch.set_rng_state(self.streams[1])
        if self.streams[2] is not None:
            torch.cuda.set_rng_state(self.streams[2], self.generator.device)
