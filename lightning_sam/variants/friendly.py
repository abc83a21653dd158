"""Friendly-SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from lightning_sam.perturbation import Perturbation, PerturbGroup, perturb_
from lightning_sam.variants.base import Variant, check_non_negative, sq_norm
from lightning_sam.variants.schedules import RhoSchedule


class FriendlySAM(Variant):
    """Climb along g minus an estimate of the full gradient: ε ∝ g − σ·m, with m an EMA of past batch gradients.

    As in the authors' code: the first step climbs along g and sets m = g; afterwards d = g − σ·m_{t−1}, then
    m_t = λ·m_{t−1} + (1 − λ)·g, and ε = ρ·d/‖d‖ (ASAM's scaling where the settings say ``adaptive``). The EMA is
    updated by every first pass (each micro-batch or m-chunk) and is saved in checkpoints. Memory: m (one
    parameter-sized buffer).

    Args:
        sigma: The weight σ of the subtracted full-gradient estimate (the paper's 1.0).
        lmbda: The EMA factor λ in [0, 1) (the paper's 0.6 to 0.95; its code's default 0.9).
        rho_schedule: An optional ρ schedule.
    """

    def __init__(self, sigma: float = 1.0, lmbda: float = 0.9, rho_schedule: Optional[RhoSchedule] = None) -> None:
        check_non_negative("sigma", sigma)
        if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0 <= lmbda < 1:
            raise ValueError(f"`lmbda` must be a number in [0, 1), got {lmbda!r}.")
        self.sigma, self.lmbda, self.rho_schedule = float(sigma), float(lmbda), rho_schedule
        self.momentum: dict[int, torch.Tensor] = {}
        self._order: list[int] = []

    @torch.no_grad()
    def perturb(self, groups: Sequence[PerturbGroup], epsilon: float, guard_nonfinite: bool) -> Optional[Perturbation]:
        params = [p for group in groups for p in group.params]
        grads = [g for group in groups for g in (group.grads or [p.grad for p in group.params])]
        self._order = [id(p) for p in params]
        fresh = {id(p) for p, g in zip(params, grads) if g is not None and id(p) not in self.momentum}
        pairs = [(self._moved(p, g), g) for p, g in zip(params, grads) if g is not None and id(p) not in fresh]
        for p, g in zip(params, grads):
            if id(p) in fresh:  # the first step climbs along g itself
                self.momentum[id(p)] = torch.nan_to_num(g.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        if pairs:
            momenta, current = [m for m, _ in pairs], [g for _, g in pairs]
            previous = torch._foreach_mul(momenta, self.sigma)  # σ·m_{t-1}
            updated = torch._foreach_mul(momenta, self.lmbda)
            torch._foreach_add_(updated, current, alpha=1 - self.lmbda)
            # An fp16 overflow (a non-finite g) must not reach m: that step is skipped, and m stays as it was.
            finite = torch.isfinite(sq_norm(current))
            for m, new in zip(momenta, updated):
                m.copy_(torch.where(finite, new, m))
            torch._foreach_sub_(current, previous)
        return perturb_(groups, epsilon, guard_nonfinite=guard_nonfinite)

    def _moved(self, p, g):
        m = self.momentum[id(p)]
        if m.device != g.device or m.dtype != g.dtype:
            m = self.momentum[id(p)] = m.to(g.device, g.dtype)
        return m

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": [self.momentum[i].cpu() if i in self.momentum else None for i in self._order]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state.get("momentum")
        if getattr(self, "_params", None) is not None:
            self._apply_restored()

    def bind(self, optimizer) -> None:
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._apply_restored()

    def _apply_restored(self) -> None:
        restored = getattr(self, "_restored", None)
        if restored is not None:
            self.momentum = {id(p): m for p, m in zip(self._params, restored) if m is not None}
            self._order = [id(p) for p in self._params]
            self._restored = None

    def _arguments(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "lmbda": self.lmbda}
