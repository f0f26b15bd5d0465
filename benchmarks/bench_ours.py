"""Our side of the benchmark: the CLI's real training step, inference, and the augmentation pipeline alone.

Everything goes through the package's public functions (`from_preset`, `GMLP`, `build_optimizer`, `maybe_compile`,
`train_step`, `infer`, `augment_batch`), so the numbers move when the package gets faster and nothing here needs to
change with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from bench_timing import Budget, median_latency_ms, throughput, timed
from torch import Tensor

from gmlp_vision.augment import augment_batch
from gmlp_vision.config import from_preset
from gmlp_vision.distributed import maybe_compile
from gmlp_vision.evaluate import infer
from gmlp_vision.model import GMLP
from gmlp_vision.optim import build_optimizer
from gmlp_vision.step import train_step

BATCH = 128  # the seed preset's batch
INFER_BATCH = 512
NUM_CLASSES = 100
POOL_BATCHES = 8  # distinct uint8 batches cycled through, so one batch does not sit in cache the whole time
# Uniform random pixels: mean 127.5, std 255 / sqrt(12); the model then sees inputs scaled as in a real run.
PIXEL_MEAN, PIXEL_VAR = 127.5, 255.0**2 / 12


def seed_config(precision: str, compiled: bool, threads: int, **overrides: Any) -> Any:
    """The `seed` preset as the CLI would resolve it for CIFAR-100."""
    return from_preset("seed", num_classes=NUM_CLASSES, precision=precision, compile=compiled, threads=threads,
                       **overrides)  # fmt: skip


def train_flops_per_image(cfg: Any) -> float:
    """Matrix-product FLOPs of one training image: forward x 3 (backward = two products per forward one)."""
    m = cfg.model
    n, d, f = m.num_patches, m.embed_dim, m.ffn_dim
    block = n * d * f + n * n * (f // 2) + n * (f // 2) * d
    forward = 2 * (n * m.patch_size**2 * m.in_chans * d + m.depth * block + d * m.num_classes)
    return 3.0 * forward


def random_uint8(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random 32x32 RGB images as a uint8 (N, 3, 32, 32) tensor."""
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


def new_model(cfg: Any) -> GMLP:
    """A fresh seeded model; normalisation set as training would (skipped if the package drops the method)."""
    torch.manual_seed(0)
    model = GMLP(cfg.model)
    if hasattr(model, "set_normalization"):
        model.set_normalization(torch.full((3,), PIXEL_MEAN), torch.full((3,), PIXEL_VAR))
    return model


def bench_mode(precision: str, compiled: bool, threads: int, budget: Budget, latency_seconds: float) -> dict[str, Any]:
    """Train (with and without augmentation) and inference numbers of one precision/compile mode.

    Returns:
        A dict of results; on failure (e.g. a compile error) it holds what was measured so far plus ``error``.
    """
    import torch._dynamo

    torch._dynamo.reset()  # each mode compiles from scratch and never hits the previous mode's recompile limit
    out: dict[str, Any] = {"precision": precision, "compile": compiled}
    try:
        cfg = seed_config(precision, compiled, threads)
        out["train_flops_per_image"] = train_flops_per_image(cfg)
        model = new_model(cfg)
        optimizer = build_optimizer(cfg.optim, model)
        model = maybe_compile(model, cfg.run.compile)
        model.train()
        generator = torch.Generator().manual_seed(0)
        data = torch.Generator().manual_seed(1)
        pool = itertools.cycle(
            [(random_uint8(BATCH, data), torch.randint(0, NUM_CLASSES, (BATCH,), generator=data))
             for _ in range(POOL_BATCHES)]
        )  # fmt: skip

        def step(run_cfg: Any) -> None:
            images, labels = next(pool)
            train_step(model, optimizer, images, labels, run_cfg, generator)

        out["train_first_step_s"] = timed(lambda: step(cfg))[1]  # the compile, for compiled modes
        out["train"] = throughput(lambda: step(cfg), BATCH, budget).to_dict()
        no_aug = cfg.replace(flip=False, zoom=0.0)
        out["train_no_aug"] = throughput(lambda: step(no_aug), BATCH, budget).to_dict()
        # lucidrains has no dropout: this row is the like-for-like one against it (issue 15), compiled modes too
        out["train_no_aug_no_dropout"] = _train_without_dropout(precision, compiled, threads, budget, pool, generator)

        model.eval()
        batch = random_uint8(INFER_BATCH, data)
        single = batch[:1].clone()
        with torch.inference_mode():
            out["infer_first_call_s"] = timed(lambda: infer(model, batch, precision))[1]
            out["infer"] = throughput(lambda: infer(model, batch, precision), INFER_BATCH, budget).to_dict()
            out["latency_first_call_s"] = timed(lambda: infer(model, single, precision))[1]
            out["latency_ms"] = median_latency_ms(lambda: infer(model, single, precision), latency_seconds)
    except Exception as exc:  # a benchmark reports a failing mode and goes on with the others
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return out


def _train_without_dropout(
    precision: str,
    compiled: bool,
    threads: int,
    budget: Budget,
    pool: Iterator[tuple[Tensor, Tensor]],
    generator: torch.Generator,
) -> dict[str, Any]:
    """Training img/s of the seed model with both dropouts at 0, without augmentation (its compile not timed)."""
    cfg = seed_config(precision, compiled, threads, dropout=0.0, head_dropout=0.0, flip=False, zoom=0.0)
    model = new_model(cfg)
    optimizer = build_optimizer(cfg.optim, model)
    model = maybe_compile(model, cfg.run.compile)
    model.train()

    def step() -> None:
        images, labels = next(pool)
        train_step(model, optimizer, images, labels, cfg, generator)

    return throughput(step, BATCH, budget).to_dict()


def bench_augment(budget: Budget, dataset_size: int = 50_000) -> dict[str, Any]:
    """Batch gathering plus flip + zoom alone: random index batches of 128 from a CIFAR-sized uint8 tensor."""
    generator = torch.Generator().manual_seed(0)
    images = random_uint8(dataset_size, generator)

    def step() -> None:
        idx = torch.randint(0, dataset_size, (BATCH,), generator=generator)
        augment_batch(images[idx].float(), flip=True, zoom_amount=0.2, generator=generator)

    rate = throughput(step, BATCH, budget)
    return {"dataset_size": dataset_size, "batch": BATCH, "rate": rate.to_dict()}
