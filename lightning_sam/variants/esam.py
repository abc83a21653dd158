"""ESAM (Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks", ICLR 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sam.perturbation import Perturbation, PerturbGroup, perturb_
from lightning_sam.variants.base import SeededDraws, Variant, check_fraction


class ESAM(SeededDraws, Variant):
    """Stochastic weight perturbation (SWP) and sharpness-sensitive data selection (SDS).

    SWP: each step, every parameter tensor is kept with probability ``beta`` (as in the authors' code: whole
    tensors, drawn from the variant's own generator, the same on every rank); only the kept ones get a first-pass
    gradient (the backward skips the others' weight gradients) and an ε, scaled by 1/β as in that code:
    ε = ρ/β·g/‖g‖ over the kept tensors.

    SDS (``gamma < 1``): after the climb, the per-example losses at w + ε are computed without gradient, and the
    second forward-backward runs on the fraction ``gamma`` of the examples whose loss rose most. It needs the
    per-example losses: ``training_step`` returns a dict with ``"loss"`` (the mean) and ``"losses"`` (one per
    example); ``SAMOptimizer.step(closure)`` calls ``closure(indices)`` (see there). With ``gamma = 1`` nothing is
    needed beyond a plain ``training_step``.

    Cost (F = a forward, B = a backward ≈ 2F): F + B·(share of weight gradients) + F (SDS only) + γ·(F + B).

    Args:
        beta: The fraction of parameter tensors perturbed each step, in (0, 1].
        gamma: The fraction of examples in the second pass, in (0, 1].
        seed: Seed of SWP's draws.
    """

    def __init__(self, beta: float = 0.6, gamma: float = 0.5, seed: int = 0) -> None:
        check_fraction("beta", beta)
        check_fraction("gamma", gamma)
        self.beta, self.gamma = float(beta), float(gamma)
        self._seed(seed)
        self.needs_example_losses = self.gamma < 1

    def first_pass_params(self, params: Sequence[Tensor]) -> list[Tensor]:
        if self.beta == 1:
            return list(params)
        keep = torch.rand(len(params), generator=self.generator) < self.beta
        return [p for p, k in zip(params, keep.tolist()) if k]

    def perturb(self, groups: Sequence[PerturbGroup], epsilon: float, guard_nonfinite: bool) -> Optional[Perturbation]:
        scaled = [replace(g, rho=g.rho / self.beta) for g in groups]
        return perturb_(scaled, epsilon, guard_nonfinite=guard_nonfinite)

    def select_examples(self, losses_at_w: Tensor, losses_perturbed: Tensor) -> Optional[Tensor]:
        if self.gamma == 1:
            return None
        count = max(1, int(len(losses_at_w) * self.gamma))
        return torch.topk((losses_perturbed - losses_at_w).detach(), count).indices

    def _arguments(self) -> dict[str, Any]:
        return {"beta": self.beta, "gamma": self.gamma, "seed": self.seed}
