"""AE-SAM (Jiang et al., "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023)."""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import Tensor

from lightning_sam.variants.base import Variant, check_non_negative, check_positive_int


class AESAM(Variant):
    """SAM only on steps whose squared gradient norm is unusually large; a plain step otherwise.

    With μ_t and σ²_t exponential moving averages (forgetting rate ``delta``) of ‖g_t‖², updated with every
    step's first-pass gradient: SAM when ‖g_t‖² ≥ μ_t + c_t·σ_t, else the plain step with g_t (the first pass
    is reused: no extra cost). c_t goes linearly from ``c`` to ``c_end`` over ``total_steps`` (the paper's λ₁ → λ₂
    schedule; constant ``c`` without them). The first step is always SAM. Each step reads ‖g‖² on the host once, to
    decide (one device sync per step). Cost: 1 + the fraction of SAM steps.

    The paper lets c_t start negative (λ₁ = −1: SAM on most early steps); here c_t ≥ 0, so at least the steps up
    to the mean are plain. Under DDP each device would decide from its own gradient: refused there (the decision
    would need an extra all-reduce).

    Args:
        c: The threshold in standard deviations (at the start of the schedule).
        c_end: With ``total_steps``, the threshold at the end.
        total_steps: The length of the schedule, in optimizer steps.
        delta: The EMA forgetting rate δ of μ and σ² (the paper's 0.9).
    """

    supports_distributed = False

    def __init__(
        self, c: float = 0.0, c_end: Optional[float] = None, total_steps: Optional[int] = None, delta: float = 0.9
    ) -> None:
        check_non_negative("c", c)
        if (c_end is None) != (total_steps is None):
            raise ValueError("`c_end` and `total_steps` go together: give both for a schedule, or neither.")
        if c_end is not None:
            check_non_negative("c_end", c_end)
            check_positive_int("total_steps", total_steps)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
            raise ValueError(f"`delta` must be a number in [0, 1), got {delta!r}.")
        self.c, self.c_end, self.total_steps, self.delta = float(c), c_end, total_steps, float(delta)
        self.mean: Optional[float] = None
        self.var = 0.0

    def threshold(self, step: int) -> float:
        if self.c_end is None:
            return self.c
        return self.c + (self.c_end - self.c) * min(step, self.total_steps) / self.total_steps

    def plan(self, step: int) -> Optional[bool]:
        return None

    def decide(self, step: int, grad_sq_norm: Tensor) -> bool:
        value = float(grad_sq_norm)  # the one host read of the step
        if not math.isfinite(value):
            return True  # an fp16 overflow: the SAM step skips it, and the statistics stay as they were
        if self.mean is None:
            self.mean, self.var = value, 0.0
            return True
        self.mean = self.delta * self.mean + (1 - self.delta) * value
        self.var = self.delta * self.var + (1 - self.delta) * (value - self.mean) ** 2
        return value >= self.mean + self.threshold(step) * self.var**0.5

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var = state.get("mean"), float(state.get("var", 0.0))

    def _arguments(self) -> dict[str, Any]:
        return {"c": self.c, "c_end": self.c_end, "total_steps": self.total_steps, "delta": self.delta}
