"""Random switching between SAM and plain steps (RST / G-RST, Zhao et al., "SS-SAM: Stochastic Scheduled
Sharpness-Aware Minimization", 2022)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch

from lightning_sam.variants.base import SeededDraws, Variant, check_fraction, check_positive_int


class RandomSAM(SeededDraws, Variant):
    """SAM with probability p_t on each optimizer step, a plain step otherwise.

    p_t is ``p`` (RST), or follows a schedule from ``p`` to ``p_end`` over ``total_steps`` (G-RST's scheduled
    probability): ``"linear"`` or ``"cosine"``. The draws come from the variant's own generator (seeded by ``seed``,
    never the global RNG), one per optimizer step, so they are reproducible, identical on every DDP rank, and
    resume exactly (the generator state is checkpointed). Cost: 1 + p passes per step on average.

    Args:
        p: The probability of a SAM step (at the start of the schedule).
        p_end: With ``total_steps``, the probability at the end of the schedule.
        total_steps: The length of the schedule in optimizer steps; p stays at ``p_end`` afterwards.
        schedule: ``"linear"`` or ``"cosine"`` between ``p`` and ``p_end``.
        seed: Seed of the draws.
    """

    def __init__(
        self,
        p: float = 0.5,
        p_end: Optional[float] = None,
        total_steps: Optional[int] = None,
        schedule: Literal["linear", "cosine"] = "linear",
        seed: int = 0,
    ) -> None:
        check_fraction("p", p, allow_zero=True)
        if (p_end is None) != (total_steps is None):
            raise ValueError("`p_end` and `total_steps` go together: give both for a schedule, or neither.")
        if p_end is not None:
            check_fraction("p_end", p_end, allow_zero=True)
            check_positive_int("total_steps", total_steps)
        if schedule not in ("linear", "cosine"):
            raise ValueError(f'`schedule` must be "linear" or "cosine", got {schedule!r}.')
        self.p, self.p_end, self.total_steps, self.schedule = p, p_end, total_steps, schedule
        self._seed(seed)

    def probability(self, step: int) -> float:
        if self.p_end is None:
            return self.p
        t = min(step, self.total_steps) / self.total_steps
        if self.schedule == "cosine":
            t = (1 - math.cos(math.pi * t)) / 2
        return self.p + (self.p_end - self.p) * t

    def plan(self, step: int) -> Optional[bool]:
        draw = torch.rand((), generator=self.generator).item()  # a CPU generator: no device sync
        return draw < self.probability(step)

    def _arguments(self) -> dict[str, Any]:
        return {"p": self.p, "p_end": self.p_end, "total_steps": self.total_steps, "schedule": self.schedule}
