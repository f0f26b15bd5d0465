"""The tutorial's optimiser and epoch-level rules with Keras 2 / TensorFlow-Addons semantics (tests/test_fidelity.py).

- `KerasAdamW`: TF-Addons ``AdamW`` (``DecoupledWeightDecayExtension`` over Keras ``Adam``). Every step first decays
  every parameter by ``w *= 1 - weight_decay``, independent of the learning rate (it stays when the lr is halved),
  then applies Adam in Keras' form ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`` with
  ``eps = 1e-7``. ``torch.optim.AdamW`` scales the decay by the lr and adds eps to the bias-corrected sqrt(v), so it
  does not match.
- `Plateau`: Keras ``ReduceLROnPlateau(factor, patience)``: an epoch improves when ``loss < best - threshold``;
  on the ``patience``-th non-improving epoch in a row the lr is multiplied by ``factor`` and the count restarts.
- `EarlyStopping`: Keras 2 ``EarlyStopping(patience, restore_best_weights=True)``: an epoch improves when
  ``loss < best`` (strictly); training stops on the ``patience``-th non-improving epoch in a row.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gmlp_vision.config.groups import OptimConfig
from gmlp_vision.optim_muon import MuonAdamW, hidden_matrices


class KerasAdamW(torch.optim.Optimizer):
    """AdamW exactly as TF-Addons 0.23 computes it (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: Adam's ``(beta_1, beta_2)``.
        eps: Keras' epsilon, added to ``sqrt(v)`` before the bias correction is applied through the step size.
        weight_decay: per-step multiplicative decay, not scaled by the lr.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid KerasAdamW settings: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("KerasAdamW does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, s in zip(params, states, strict=True):
                if not s:
                    s.update(_fresh_state(p, 0))
                s["step"] += 1
            size = _keras_step_size(group, states[0]["step"])  # all parameters of a group advance together
            m = [s["exp_avg"] for s in states]
            v = [s["exp_avg_sq"] for s in states]
            _adamw_update(params, grads, m, v, group, (1.0 - group["weight_decay"], size, 1.0))


def _fresh_state(p: Tensor, step: int | Tensor) -> dict[str, Any]:
    """A parameter's optimiser state before its first step: the count and two zero moment buffers."""
    zeros = [torch.zeros_like(p, memory_format=torch.preserve_format) for _ in range(2)]
    return {"step": step, "exp_avg": zeros[0], "exp_avg_sq": zeros[1]}


def _keras_step_size(group: dict[str, Any], t: int) -> float:
    """Keras' Adam step size at step ``t``: ``lr sqrt(1 - b2^t) / (1 - b1^t)``."""
    b1, b2 = group["betas"]
    return group["lr"] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)


def _adamw_update(
    params: list[Tensor],
    grads: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    group: dict[str, Any],
    scalars: tuple[float | Tensor, float | Tensor, float | Tensor],
) -> None:
    """``p = decay * p - size * m / (scale * sqrt(v) + eps)`` after the moment updates, with host or device scalars.

    `KerasAdamW.step` and the captured `adamw_apply` both run it, so the two compute the same bits on each device:
    on a CPU the last part is one ``addcdiv`` (with a device scalar, of the moment scaled first, which rounds the
    same), on a GPU a division, a multiplication by the step size and a subtraction. ``eps`` is the group's
    constant: a CUDA graph can hold it, where an add of a device scalar would synchronise.
    """
    b1, b2 = group["betas"]
    decay, size, scale = scalars
    if not isinstance(decay, float) or decay != 1.0:
        torch._foreach_mul_(params, decay)
    torch._foreach_lerp_(m, grads, 1.0 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
    denom = torch._foreach_sqrt(v)
    if not isinstance(scale, float) or scale != 1.0:
        torch._foreach_mul_(denom, scale)
    torch._foreach_add_(denom, group["eps"])
    if params[0].device.type == "cpu":
        if isinstance(size, Tensor):
            torch._foreach_addcdiv_(params, torch._foreach_mul(m, size), denom, value=-1.0)
        else:
            torch._foreach_addcdiv_(params, m, denom, value=-size)
        return
    step = torch._foreach_div(m, denom)
    torch._foreach_mul_(step, size)
    torch._foreach_sub_(params, step)


# The whole AdamW step on the device, for a captured CUDA graph (`graphs`): what changes from step to step (the lr,
# the bias corrections) comes in as device scalars, three per parameter group, which the host sets before each replay.
ADAMW_SCALARS = 3  # decay factor, step size, scale of sqrt(v): ``p = decay p - size m / (scale sqrt(v) + eps)``


def init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the moment buffers (and step counts) of every parameter now, as the optimiser's first step would.

    A captured update must find them in place: they are the graph's inputs, and never reallocated afterwards.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state[p]
            if s or not p.requires_grad:
                continue
            keras = isinstance(optimizer, KerasAdamW)
            s.update(_fresh_state(p, 0 if keras else torch.tensor(0.0, dtype=torch.float32)))


def adamw_scalars(optimizer: torch.optim.Optimizer) -> list[tuple[float, float, float]]:
    """Count one step for every parameter (on the host) and return each group's scalars for `adamw_apply`.

    With ``c1 = 1 - b1^t`` and ``c2 = 1 - b2^t``: ``KerasAdamW`` has decay ``1 - wd``, size ``lr sqrt(c2) / c1`` and
    scale 1; ``torch.optim.AdamW`` decay ``1 - lr wd``, size ``lr / c1`` and scale ``1 / sqrt(c2)``.
    """
    keras = isinstance(optimizer, KerasAdamW)
    out = []
    for group in optimizer.param_groups:
        # A frozen parameter gets no gradient: the eager step leaves it uncounted too.
        states = [optimizer.state[p] for p in group["params"] if p.requires_grad]
        if keras:
            for s in states:
                s["step"] += 1
        elif states:  # torch's counts are CPU tensors: one call for the group, not one op per parameter
            torch._foreach_add_([s["step"] for s in states], 1.0)
        t = max(int(states[-1]["step"]), 1) if states else 1
        lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
        if keras:
            out.append((1.0 - wd, _keras_step_size(group, t), 1.0))
        else:
            out.append((1.0 - lr * wd, lr / (1.0 - b1**t), 1.0 / math.sqrt(1.0 - b2**t)))
    return out


@torch.no_grad()
def adamw_apply(optimizer: torch.optim.Optimizer, scalars: Tensor) -> None:
    """Apply the update of `adamw_scalars` to every parameter with a gradient; ``scalars`` is (groups, 3), on device.

    No host synchronisation and no Python numbers that change between steps, so a CUDA graph can capture it.
    """
    for g, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        m = [optimizer.state[p]["exp_avg"] for p in params]
        v = [optimizer.state[p]["exp_avg_sq"] for p in params]
        _adamw_update(params, grads, m, v, group, tuple(scalars[g].unbind()))


def scheduled_lr(step: int, total: int, *, lr: float, schedule: str, warmup: int = 0, min_lr: float = 0.0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``: a pure function, so a resumed run agrees.

    ``constant``: ``lr`` after the warm-up. ``cosine``: linear warm-up from ~0 over ``warmup`` steps, then a half
    cosine from ``lr`` down to ``min_lr`` at the last step. ``onecycle``: the same cosine shape on both sides of its
    peak at ``warmup`` steps (cosine warm-up from ``lr / 25``, as ``torch.optim.lr_scheduler.OneCycleLR``).
    """
    if schedule == "onecycle":
        start = lr / 25.0
        if step < warmup:
            return start + (lr - start) * 0.5 * (1.0 - math.cos(math.pi * step / warmup))
    elif step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    done = (step - warmup) / max(total - 1 - warmup, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


@dataclass(frozen=True)
class LrSchedule:
    """The one place that decides the learning rate of every optimiser step of a run (`scheduled_lr`'s shape).

    A constant schedule leaves the lr to the optimiser outside its warm-up, so that `Plateau`'s halvings stick; the
    other schedules set it at every step from the step alone, so a resumed run agrees exactly.
    """

    lr: float
    schedule: str
    total: int  # optimiser steps in the whole run
    warmup: int  # warm-up steps
    min_lr: float = 0.0

    @classmethod
    def from_config(cls, optim: OptimConfig, steps_per_epoch: int) -> LrSchedule:
        """The schedule of ``optim`` for epochs of ``steps_per_epoch`` steps."""
        warmup = round(optim.warmup_epochs * steps_per_epoch)
        return cls(optim.lr, optim.schedule, optim.epochs * steps_per_epoch, warmup, optim.min_lr)

    def lr_at(self, step: int) -> float | None:
        """The lr of step ``step`` (0-based); None where the optimiser's own lr applies."""
        if self.schedule == "constant" and not (self.warmup and step <= self.warmup):
            return None
        shape = dict(lr=self.lr, schedule=self.schedule, warmup=self.warmup, min_lr=self.min_lr)
        return scheduled_lr(step, self.total, **shape)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set the lr of step ``step`` in every parameter group (nothing where the optimiser's own lr applies).

        A group with an ``lr_scale`` (layer-wise decay, `layer_groups`) gets that share of it.
        """
        lr = self.lr_at(step)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr

    def warning(self) -> str | None:
        """What is wrong with a warm-up that covers the whole run (``--epochs`` no longer than ``--warmup-epochs``)."""
        if not self.warmup or self.warmup < self.total or not self.total:
            return None
        peak = max(self.lr_at(0) or 0.0, self.lr_at(self.total - 1) or 0.0)
        return (
            f"the lr warm-up ({self.warmup} steps) covers the whole run ({self.total} steps): the lr only rises, to "
            f"{peak:.3g} at most of --lr {self.lr:g}, and never anneals; give more --epochs or fewer --warmup-epochs"
        )

    def reported(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """The lr step ``step`` runs with, for the history: the scheduled one, else the optimiser's."""
        lr = self.lr_at(step)
        return base_lr(optimizer) if lr is None else lr


class Plateau:
    """Keras ``ReduceLROnPlateau`` (no cooldown, no floor); call `step` once per epoch with the monitored loss."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, factor: float = 0.5, patience: int = 5, threshold: float = 1e-4
    ):
        self.optimizer, self.factor, self.patience, self.threshold = optimizer, factor, patience, threshold
        self.best = math.inf
        self.wait = 0

    def step(self, loss: float) -> bool:
        """Record one epoch's loss; returns whether the lr was reduced."""
        if loss < self.best - self.threshold:
            self.best, self.wait = loss, 0
            return False
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.factor
            self.wait = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])


class EarlyStopping:
    """Keras 2 ``EarlyStopping`` on a loss; `step` returns True when training should stop after this epoch."""

    def __init__(self, patience: int = 10) -> None:
        self.patience = patience
        self.best = math.inf
        self.best_epoch = -1
        self.wait = 0

    def step(self, loss: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s (0-based) loss; True on the ``patience``-th epoch in a row without improvement."""
        self.wait += 1
        if loss < self.best:
            self.best, self.best_epoch, self.wait = loss, epoch, 0
            return False
        # Keras also requires epoch > 0; with patience >= 1 that only matters for patience 1.
        return bool(self.patience) and self.wait >= self.patience and epoch > 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.wait = float(state["best"]), int(state["best_epoch"]), int(state["wait"])


class WeightEMA:
    """An exponential moving average of a model's weights (Polyak averaging).

    After every optimiser step each averaged parameter moves towards the live one:
    ``ema = d * ema + (1 - d) * w`` with ``d = min(decay, (1 + t) / (10 + t))`` at update ``t`` (1-based), so the
    first steps, when the weights move fast, are not held back by the random initialisation (the warm-up of
    TensorFlow's ``ExponentialMovingAverage(num_updates=t)``). Buffers are copied
    once (the model's are constant). ``module`` is a full model in eval mode: evaluate, save or export it as any other.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._averaged = list(self.module.parameters())  # load_state_dict copies in place: these stay valid

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards ``model``'s current parameters (the unwrapped module)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._averaged, list(model.parameters()), 1.0 - d)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


def build_optimizer(optim: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser; without ``optim.decay_norms_biases``, vectors (norms, biases) get no weight decay.

    With ``optim.layer_decay`` below 1, each layer gets a parameter group whose ``lr_scale`` is the decay to the
    power of its depth below the top (`layer_groups`); `LrSchedule` and the optimiser apply it to every lr.
    ``muon``: `optim_muon.MuonAdamW`, which splits each group into Muon's matrices and AdamW's rest.
    """
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if optim.layer_decay != 1.0:
        groups = layer_groups(model, optim.layer_decay, optim.decay_norms_biases)
        for group in groups:
            group["lr"] = optim.lr * group["lr_scale"]
    elif not optim.decay_norms_biases:
        params = groups[0]["params"]
        groups = [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    if optim.optimizer == "keras-adamw":
        return KerasAdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "muon":
        return MuonAdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, hidden=hidden_matrices(model))
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The optimiser's lr before any layer's ``lr_scale`` (the top layer's, `layer_groups`), else its first group's."""
    top = optimizer.param_groups[-1]
    return top["lr"] / top["lr_scale"] if "lr_scale" in top else optimizer.param_groups[0]["lr"]


def layer_groups(model: nn.Module, decay: float, decay_vectors: bool = True) -> list[dict[str, Any]]:
    """Parameter groups for layer-wise lr decay (BEiT's), from the bottom up, each with its ``lr_scale``.

    The layers: the patch stem, each block, then the final norm with the head (the top, scale 1); a block ``i`` of
    ``n`` trains at ``decay ** (n - i)`` of the lr, the stem at ``decay ** (n + 1)``. Without ``decay_vectors``,
    each layer's vectors (norms, biases) get a group of their own with no weight decay.
    """
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        layer = 0 if name.startswith("patch_embed.") else depth + 1
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        vector = not decay_vectors and p.ndim <= 1
        group = groups.setdefault((layer, vector), {"params": [], "lr_scale": decay ** (depth + 1 - layer)})
        if vector:
            group["weight_decay"] = 0.0
        group["params"].append(p)
    return [groups[key] for key in sorted(groups)]
