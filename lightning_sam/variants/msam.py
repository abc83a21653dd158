"""MSAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead", 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch.optim import Optimizer

from lightning_sam.perturbation import Perturbation, PerturbGroup, grad_norm
from lightning_sam.variants.base import Variant

# Where each base optimizer keeps the momentum, and how to tell that it has one.
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MSAM(Variant):
    """Climb along the base optimizer's momentum: ε = −ρ·v/‖v‖, with no extra pass.

    Each step runs one forward-backward, at w + ε, and the base optimizer steps from w with that gradient (the
    reference code keeps the weights at the perturbed point between steps and moves back at the end; taking the
    step from w is the same update). v is SGD's ``momentum_buffer`` or Adam/AdamW's ``exp_avg``; the norm runs over
    all parameters that have one. Before the base optimizer has a momentum (the first step), ε = 0. ρ is the run's
    (per param group as usual); the paper's best ρ for MSAM is larger than SAM's. The logged loss is the loss at
    w + ε (it is the only pass). Cost: about 1 pass per step; memory: the copy of w.

    Refused for a base optimizer without momentum (plain SGD, SGD with ``momentum=0``, Adagrad...).
    """

    climbs_before_forward = True
    supports_chunks = False

    def bind(self, optimizer: Optimizer) -> None:
        groups = optimizer.param_groups
        has_sgd_momentum = all(group.get("momentum", 0) > 0 for group in groups) and "momentum" in groups[0]
        has_adam_momentum = all(group.get("betas", (0.0,))[0] > 0 for group in groups) and "betas" in groups[0]
        if not (has_sgd_momentum or has_adam_momentum):
            raise ValueError(
                f"MSAM climbs along the base optimizer's momentum, but {type(optimizer).__name__} with these settings"
                " has none. Use SGD with `momentum > 0`, or Adam / AdamW (betas[0] > 0)."
            )

    @torch.no_grad()
    def climb(self, groups: Sequence[PerturbGroup], optimizer: Optimizer, epsilon: float) -> Optional[Perturbation]:
        selected = []
        for group in groups:
            for p in group.params:
                state = optimizer.state.get(p, {})
                v = next((state[key] for key in _MOMENTUM_KEYS if key in state), None)
                if v is not None and p.requires_grad:
                    selected.append((group, p, v))
        if not selected:
            return None
        params = [p for _, p, _ in selected]
        momenta = [v for _, _, v in selected]
        norm = grad_norm(momenta)
        finite = torch.isfinite(norm)
        inv = torch.where(finite & (norm > 0), 1.0 / (norm + epsilon), 0.0)
        backup = torch._foreach_clone(params)
        for group in groups:
            mine = [(p, v) for g, p, v in selected if g is group]
            if mine:
                step = torch._foreach_mul([v for _, v in mine], -group.rho * inv)
                torch._foreach_add_([p for p, _ in mine], step)
        return Perturbation(params=params, backup=backup, grad_norm=norm, finite=finite)
