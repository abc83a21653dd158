"""ρ schedules: the radius as a function of the optimizer step or of the learning rate.

A schedule gives the absolute ρ_t of a step; a param group with its own ``"rho"`` is scaled by the same factor
(ρ_t / the run's ρ). Every schedule stays within the two values it is given, both ≥ 0: ρ never goes negative, during
warm-up included (big_vision issue 80: GSAM's ρ tied to a warming-up LR went below ρ_min).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lightning_sam.variants.base import check_non_negative


class RhoSchedule:
    """ρ_t for optimizer step ``step`` (from 0) with learning rate ``lr`` (the first param group's); ``base_lr`` is
    the group's ``initial_lr`` where a torch LR scheduler recorded one (the peak LR of a warm-up), else None."""

    def __call__(self, step: int, lr: float, base_lr: Optional[float] = None) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items() if not k.startswith('_'))})"
        )


def _check_pair(low_name: str, low: float, high_name: str, high: float) -> None:
    check_non_negative(low_name, low)
    check_non_negative(high_name, high)


class ConstantRho(RhoSchedule):
    """ρ_t = ``rho``, after an optional linear warm-up from 0 over ``warmup_steps``."""

    def __init__(self, rho: float, warmup_steps: int = 0) -> None:
        check_non_negative("rho", rho)
        _check_warmup(warmup_steps)
        self.rho, self.warmup_steps = float(rho), warmup_steps

    def __call__(self, step: int, lr: float, base_lr: Optional[float] = None) -> float:
        return self.rho * _warmup(step, self.warmup_steps)


class _Between(RhoSchedule):
    """ρ_t from ``start`` to ``end`` over ``total_steps`` (then ``end``) along ``_shape``, after an optional linear
    warm-up from 0 over ``warmup_steps``."""

    def __init__(self, start: float, end: float, total_steps: int, warmup_steps: int = 0) -> None:
        _check_pair("start", start, "end", end)
        _check_steps(total_steps)
        _check_warmup(warmup_steps)
        self.start, self.end, self.total_steps, self.warmup_steps = float(start), float(end), total_steps, warmup_steps

    def __call__(self, step: int, lr: float, base_lr: Optional[float] = None) -> float:
        progress = self._shape(min(step, self.total_steps) / self.total_steps)
        return (self.start + (self.end - self.start) * progress) * _warmup(step, self.warmup_steps)

    @staticmethod
    def _shape(t: float) -> float:
        raise NotImplementedError


class LinearRho(_Between):
    """ρ_t from ``start`` to ``end`` linearly over ``total_steps`` (then ``end``), after an optional warm-up from 0."""

    @staticmethod
    def _shape(t: float) -> float:
        return t


class CosineRho(_Between):
    """ρ_t from ``start`` to ``end`` along a half cosine over ``total_steps``, after an optional warm-up from 0."""

    @staticmethod
    def _shape(t: float) -> float:
        return (1 - math.cos(math.pi * t)) / 2


class LRTiedRho(RhoSchedule):
    """ρ_t follows the learning rate: ρ_min + (ρ_max − ρ_min)·(lr − lr_min)/(lr_max − lr_min), clamped to
    [ρ_min, ρ_max] (GSAM's schedule, Zhuang et al. 2022).

    ``lr_max`` defaults to the peak LR: the ``initial_lr`` that torch's LR schedulers record in the param group (the
    LR a warm-up climbs to), else the largest LR seen so far (kept in the checkpoint). So ρ rises with the LR during
    a warm-up and falls with it during the decay; an LR below ``lr_min`` gives ρ_min, never less (big_vision's
    formula went negative there).

    Args:
        rho_max: ρ at the peak LR.
        rho_min: ρ at ``lr_min`` and below; at most ``rho_max``.
        lr_min: The LR at which ρ reaches ``rho_min`` (the end of a cosine or linear decay: usually 0).
        lr_max: The LR at which ρ is ``rho_max``; ``None``: the scheduler's ``initial_lr``, or the largest LR seen.
    """

    def __init__(
        self, rho_max: float, rho_min: float = 0.0, lr_min: float = 0.0, lr_max: Optional[float] = None
    ) -> None:
        _check_pair("rho_min", rho_min, "rho_max", rho_max)
        if rho_min > rho_max:
            raise ValueError(f"`rho_min` ({rho_min}) must not exceed `rho_max` ({rho_max}).")
        check_non_negative("lr_min", lr_min)
        if lr_max is not None and not lr_max > lr_min:
            raise ValueError(f"`lr_max` ({lr_max}) must exceed `lr_min` ({lr_min}).")
        self.rho_max, self.rho_min, self.lr_min, self.lr_max = float(rho_max), float(rho_min), float(lr_min), lr_max
        self._seen_max: Optional[float] = None

    def __call__(self, step: int, lr: float, base_lr: Optional[float] = None) -> float:
        self._seen_max = lr if self._seen_max is None else max(self._seen_max, lr)
        lr_max = self.lr_max if self.lr_max is not None else (base_lr if base_lr is not None else self._seen_max)
        if lr_max <= self.lr_min:
            return self.rho_max
        t = min(max((lr - self.lr_min) / (lr_max - self.lr_min), 0.0), 1.0)
        return self.rho_min + (self.rho_max - self.rho_min) * t

    def state_dict(self) -> dict[str, Any]:
        return {"seen_max": self._seen_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seen_max = state.get("seen_max")


def _check_steps(total_steps: Any) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"`total_steps` must be an integer >= 1, got {total_steps!r}.")


def _check_warmup(warmup_steps: Any) -> None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}.")


def _warmup(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
