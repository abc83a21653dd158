"""GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_sam.variants.base import Grads, Variant, axpy_, check_non_negative, dot, sq_norm
from lightning_sam.variants.schedules import LRTiedRho, RhoSchedule


class GSAM(Variant):
    """SAM's gradient minus α times the part of g orthogonal to it: g_s − α·g⊥.

    With g = ∇L(w), g_s = ∇L(w + ε) and g⊥ = g − (g·g_s/‖g_s‖²)·g_s (norms and dot products over all perturbed
    parameters). ρ follows the learning rate between ``rho_max`` and ``rho_min`` (``LRTiedRho``), never below
    ``rho_min`` (≥ 0), warm-up included; pass another ``rho_schedule`` to change that. Under accumulation, m-chunks
    or DDP, each micro-batch (chunk, device) combines its own g and g_s, as ε is per micro-batch. Memory: a copy of
    g (one parameter-sized buffer) during the step.

    Args:
        alpha: The weight α ≥ 0 of the orthogonal correction (the paper uses 0.01 to 0.3).
        rho_max: ρ at the largest learning rate.
        rho_min: ρ at ``lr_min``.
        lr_min: The learning rate at which ρ reaches ``rho_min``.
        rho_schedule: Replaces the LR-tied schedule.
    """

    keeps_first_gradient = True

    def __init__(
        self,
        alpha: float = 0.1,
        rho_max: float = 0.05,
        rho_min: float = 0.0,
        lr_min: float = 0.0,
        rho_schedule: Optional[RhoSchedule] = None,
    ) -> None:
        check_non_negative("alpha", alpha)
        self.alpha = float(alpha)
        self.rho_schedule = rho_schedule or LRTiedRho(rho_max=rho_max, rho_min=rho_min, lr_min=lr_min)

    def combine(self, grads_at_w: Optional[Grads], grads_perturbed: Grads) -> Grads:
        g, g_s = grads_at_w, grads_perturbed
        projection = dot(g, g_s) / sq_norm(g_s).clamp_min(torch.finfo(torch.float32).tiny)
        # g_s − α·(g − c·g_s) = (1 + α·c)·g_s − α·g
        final = [None if s is None else s * (1 + self.alpha * projection).to(s.dtype) for s in g_s]
        axpy_(final, torch.tensor(-self.alpha, device=projection.device), g)
        return final

    def _arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "rho_schedule": self.rho_schedule}
