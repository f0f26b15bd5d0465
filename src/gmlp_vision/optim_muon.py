"""``--optimizer muon``: PyTorch's Muon on the blocks' weight matrices, its AdamW on everything else, as one optimiser.

Muon (Keller Jordan, 2024) replaces each hidden weight matrix's update with its momentum orthogonalised by five
Newton-Schulz steps; the stem (patch embedding), the head and every vector (norms, biases) stay with AdamW, as its
authors advise. PyTorch's ``torch.optim.Muon`` runs with Moonshot's lr adjustment (``match_rms_adamw``: the update's
RMS matched to AdamW's), so both take the run's ``--lr``, ``--weight-decay`` and schedule unchanged. Its
Newton-Schulz steps run in bfloat16, which costs little where the CPU computes bf16 natively and much where it does
not (an AVX2-only CPU emulates it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

MUON_KEY = "muon"  # a parameter group's flag: True for Muon's groups, False for AdamW's


def hidden_matrices(model: nn.Module) -> set[Tensor]:
    """The 2-D weights that Muon takes: every matrix but the patch embedding's and the head's."""
    return {p for name, p in model.named_parameters() if p.ndim == 2 and not name.startswith(("patch_embed.", "head."))}


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the ``hidden`` matrices and ``torch.optim.AdamW`` on the rest, behind one optimiser.

    Each of ``groups`` (dicts with ``params`` and any per-group settings: ``lr_scale``, ``weight_decay``) is split
    into its hidden matrices (a Muon group) and the rest (an AdamW group). The two inner optimisers share this one's
    parameter groups and state, so `optim.LrSchedule` sets every group's lr and a checkpoint holds one state dict.

    Raises:
        ValueError: no parameter is a hidden matrix (Muon would have nothing to do).
    """

    def __init__(self, groups: Iterable[dict[str, Any]], *, lr: float, weight_decay: float, hidden: set[Tensor]):
        muon_groups, adamw_groups = [], []
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            params = list(group["params"])
            for side, mine in ((muon_groups, True), (adamw_groups, False)):
                chosen = [p for p in params if (p in hidden) is mine]
                if chosen:
                    side.append({**settings, "params": chosen})
        if not muon_groups:
            raise ValueError("--optimizer muon: the model has no hidden weight matrix for Muon")
        self._muon = torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        inner = [self._muon]
        if adamw_groups:
            inner.append(torch.optim.AdamW(adamw_groups, lr=lr, weight_decay=weight_decay))
        for optimizer, flag in zip(inner, (True, False), strict=False):
            for group in optimizer.param_groups:
                group[MUON_KEY] = flag
        self._inner = inner
        super().__init__([g for optimizer in inner for g in optimizer.param_groups], {"lr": lr})
        self._link()

    def _link(self) -> None:
        """Point the inner optimisers at this one's groups and state (again after `load_state_dict` replaced them)."""
        for optimizer, flag in zip(self._inner, (True, False), strict=False):
            optimizer.param_groups = [g for g in self.param_groups if g[MUON_KEY] is flag]
            optimizer.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102 (torch's, then relinked)
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: D102 (torch's)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self._inner:
            optimizer.step()
        return loss


__all__ = ["MUON_KEY", "MuonAdamW", "hidden_matrices"]
