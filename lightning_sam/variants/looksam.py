"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_sam.variants.base import Grads, Variant, axpy_, check_positive_int, dot, sq_norm


class LookSAM(Variant):
    """A full SAM step every ``k`` optimizer steps; in between, one pass that reuses the stored direction.

    On steps t with t % k == 0 (counted from 0): g at w, g_s at w + ε, and g_v = g_s − (g·g_s/‖g‖²)·g, the part of
    g_s orthogonal to g, is stored; the step uses g_s. On the other steps, one forward-backward at w: the step uses
    g + α·(‖g‖/‖g_v‖)·g_v. Norms and dot products run over all perturbed parameters. Cost: 1 + 1/k passes per step;
    memory: the stored g_v (one parameter-sized buffer), and a copy of g on SAM steps.

    Under accumulation or m-chunks, each micro-batch (chunk) combines its own g with g_v, and the stored g_v is the
    sum of the micro-batches' (its scale does not matter: only its direction is used). Under DDP each device keeps
    its own g_v (the gradients are combined per device before the all-reduce, like ε). A non-finite g_v (an fp16
    overflow) is not stored: the previous one is kept.

    Args:
        k: The period of the full SAM steps (the paper's k = 5).
        alpha: The weight of the reused direction (the paper's α = 0.7).
    """

    keeps_first_gradient = True
    modifies_plain_gradient = True

    def __init__(self, k: int = 5, alpha: float = 0.7) -> None:
        check_positive_int("k", k)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
            raise ValueError(f"`alpha` must be a finite number >= 0, got {alpha!r}.")
        self.k, self.alpha = k, float(alpha)
        self.g_v: Optional[Grads] = None
        self._fresh = False

    def plan(self, step: int) -> Optional[bool]:
        sam = step % self.k == 0
        self._fresh = sam  # the first micro-batch (chunk) of a SAM step replaces g_v, the others add to it
        return sam

    def combine(self, grads_at_w: Optional[Grads], grads_perturbed: Grads) -> Grads:
        g, g_s = grads_at_w, grads_perturbed
        coefficient = dot(g, g_s) / sq_norm(g).clamp_min(torch.finfo(torch.float32).tiny)
        g_v = [None if s is None else s.clone() for s in g_s]
        axpy_(g_v, -coefficient, g)
        self._store(g_v)
        return g_s

    def _store(self, g_v: Grads) -> None:
        finite = torch.isfinite(sq_norm(g_v))
        self._align(g_v)
        if self.g_v is None:
            self.g_v = [None if v is None else torch.where(finite, v, 0.0) for v in g_v]
        elif getattr(self, "_fresh", False):
            self.g_v = [
                new if old is None else (old if new is None else torch.where(finite, new, old))
                for old, new in zip(self.g_v, g_v)
            ]
        else:
            self.g_v = [
                new if old is None else (old if new is None else old + torch.where(finite, new, 0.0))
                for old, new in zip(self.g_v, g_v)
            ]
        self._fresh = False

    def plain(self, grads: Grads) -> Optional[Grads]:
        if self.g_v is None:
            return grads
        self._align(grads)
        g_v_norm = sq_norm(self.g_v).sqrt()
        scale = torch.where(g_v_norm > 0, self.alpha * sq_norm(grads).sqrt() / g_v_norm, 0.0)
        axpy_(grads, scale, self.g_v)
        return grads

    def state_dict(self) -> dict[str, Any]:
        return {"g_v": None if self.g_v is None else [None if v is None else v.detach().cpu() for v in self.g_v]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g_v = state.get("g_v")
        self.g_v = None if g_v is None else list(g_v)

    def _align(self, reference: Grads) -> None:
        """A g_v restored from a checkpoint (on the CPU) moves next to the gradients it meets."""
        if self.g_v is not None:
            self.g_v = [
                v
                if v is None or r is None or (v.device == r.device and v.dtype == r.dtype)
                else v.to(r.device, r.dtype)
                for v, r in zip(self.g_v, reference)
            ]

    def _arguments(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha}
