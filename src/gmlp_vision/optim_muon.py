"""``--optimizer muon``: Muon on the blocks' weight matrices, PyTorch's AdamW on everything else, as one optimiser.

Muon (Keller Jordan, 2024) replaces each hidden weight matrix's update with its Nesterov momentum orthogonalised by
five Newton-Schulz steps; the stem (patch embedding), the head and every vector (norms, biases) stay with AdamW, as
its authors advise. The update's RMS is matched to AdamW's (Moonshot's adjustment: the lr times 0.2 sqrt(max(rows,
cols))), so both sides take the run's ``--lr``, ``--weight-decay`` and schedule unchanged. The update is
``torch.optim.Muon``'s with ``adjust_lr_fn="match_rms_adamw"``, written here for one reason: PyTorch orthogonalises
in bfloat16, which CPUs without AVX-512 bf16 or AMX emulate about 20x slower than float32, so here the Newton-Schulz
steps run in bfloat16 where the device computes it natively (`precision.native_bf16`, the rule of ``--precision
auto``) and in float32 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gmlp_vision.precision import native_bf16

MUON_KEY = "muon"  # a parameter group's flag: True for Muon's groups, False for AdamW's
MOMENTUM = 0.95
NS_STEPS = 5
# The quintic's coefficients (Jordan's): the steepest slope at 0 for which the iteration still lands every singular
# value in about 0.7..1.2, which trains as well as the exact U V^T.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def hidden_matrices(model: nn.Module) -> set[Tensor]:
    """The 2-D weights that Muon takes: every matrix but the patch embedding's and the head's."""
    return {p for name, p in model.named_parameters() if p.ndim == 2 and not name.startswith(("patch_embed.", "head."))}


def orthogonalised(m: Tensor, dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> Tensor:
    """``m`` (2-D) with its singular values brought near 1 by `NS_STEPS` Newton-Schulz steps in ``dtype``.

    Returned in ``m``'s dtype.
    """
    a, b, c = NS_COEFFICIENTS
    x = m.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the wide side: the Gram matrix is the smaller one
    x = x / x.norm().clamp(min=eps)
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(m.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the ``hidden`` matrices and ``torch.optim.AdamW`` on the rest, behind one optimiser.

    Each of ``groups`` (dicts with ``params`` and any per-group settings: ``lr_scale``, ``weight_decay``) is split
    into its hidden matrices (a Muon group) and the rest (an AdamW group). The inner AdamW shares this optimiser's
    parameter groups and state, so `optim.LrSchedule` sets every group's lr and a checkpoint holds one state dict.

    Raises:
        ValueError: no parameter is a hidden matrix (Muon would have nothing to do).
    """

    def __init__(self, groups: Iterable[dict[str, Any]], *, lr: float, weight_decay: float, hidden: set[Tensor]):
        split: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            params = list(group["params"])
            for muon in (True, False):
                chosen = [p for p in params if (p in hidden) is muon]
                if chosen:
                    split[muon].append({**settings, "params": chosen, MUON_KEY: muon})
        if not split[True]:
            raise ValueError("--optimizer muon: the model has no hidden weight matrix for Muon")
        self._adamw = torch.optim.AdamW(split[False], lr=lr, weight_decay=weight_decay) if split[False] else None
        native = native_bf16(split[True][0]["params"][0].device)[0]
        self.ns_dtype = torch.bfloat16 if native else torch.float32  # of the Newton-Schulz steps
        adamw_groups = self._adamw.param_groups if self._adamw is not None else []
        super().__init__(split[True] + adamw_groups, {"lr": lr, "weight_decay": weight_decay, "momentum": MOMENTUM})
        self._link()

    def _link(self) -> None:
        """Point the inner AdamW at this optimiser's groups and state (again after `load_state_dict` replaced them)."""
        if self._adamw is not None:  # AdamW's own __setstate__ fills in what a file from another torch version lacks
            groups = [g for g in self.param_groups if not g[MUON_KEY]]
            torch.optim.AdamW.__setstate__(self._adamw, {"state": self.state, "param_groups": groups})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102 (torch's, then relinked)
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: D102 (torch's)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group[MUON_KEY]:
                self._muon_step(group)
        if self._adamw is not None:
            self._adamw.step()
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        """Decoupled weight decay, then the orthogonalised Nesterov momentum at AdamW's RMS, for each matrix."""
        lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.lerp_(p.grad, 1 - momentum)
            update = orthogonalised(p.grad.lerp(buffer, momentum), self.ns_dtype)
            p.mul_(1 - lr * decay)
            p.add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)


__all__ = ["MUON_KEY", "MuonAdamW", "hidden_matrices", "orthogonalised"]
