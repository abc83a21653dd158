"""SAM settings: one small, validated, serialisable object shared by every entry point."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Optional

BatchNormPolicy = Literal["first", "both"]
_BN_POLICIES = ("first", "both")


@dataclass(frozen=True)
class SAMConfig:
    """Settings of Sharpness-Aware Minimization (Foret et al., 2020).

    Args:
        rho: Radius of the neighbourhood in which the worst-case loss is sought. A param group may override it
            with its own ``"rho"`` key.
        adaptive: Use ASAM (Kwon et al., 2021): ε = ρ·T²g/‖T·g‖ with T = |w| + eta. A param group may override it
            with its own ``"adaptive"`` key (for example to keep biases non-adaptive).
        eta: ASAM's offset in T = |w| + eta; ignored unless ``adaptive``.
        epsilon: Added to ‖g‖ in the denominator of ε. A zero gradient gives ε = 0 whatever its value.
        interval: Run SAM on every ``interval``-th optimizer step (counted by ``trainer.global_step``) and a plain
            step on the others.
        bn_policy: ``"first"`` (default) updates BatchNorm running statistics in the first, unperturbed pass only;
            ``"both"`` lets both passes update them, as naive implementations do.
        m: Examples per ε (m-sharpness). ``None`` uses the whole per-device batch; a smaller value splits it into
            chunks of ``m`` examples, each with its own ε and its own perturbed gradient.
        log: Log ``sam/perturbed_loss``, ``sam/sharpness`` and ``sam/grad_norm`` through ``LightningModule.log``.
        same_randomness: Run the second pass with the RNG state the first pass started from (CPU and CUDA), so that
            dropout masks, stochastic depth and random augmentation inside ``training_step`` are the same at w and at
            w + ε, as in the official JAX implementation; afterwards the RNG is where the first pass left it.
    """

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01
    epsilon: float = 1e-12
    interval: int = 1
    bn_policy: BatchNormPolicy = "first"
    m: Optional[int] = None
    log: bool = True
    same_randomness: bool = False

    def __post_init__(self) -> None:
        validate_rho(self.rho)
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"`adaptive` must be a bool, got {self.adaptive!r}.")
        if not _is_real(self.eta) or self.eta < 0 or not math.isfinite(self.eta):
            raise ValueError(f"`eta` must be a finite number >= 0 (ASAM's T = |w| + eta), got {self.eta!r}.")
        if not _is_real(self.epsilon) or self.epsilon < 0 or not math.isfinite(self.epsilon):
            raise ValueError(
                f"`epsilon` must be a finite number >= 0 (it is added to the gradient norm), got {self.epsilon!r}."
            )
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(
                f"`interval` must be an integer >= 1 (SAM on every `interval`-th optimizer step),"
                f" got {self.interval!r}."
            )
        if self.bn_policy not in _BN_POLICIES:
            raise ValueError(f"`bn_policy` must be one of {_BN_POLICIES}, got {self.bn_policy!r}.")
        if self.m is not None and (not _is_int(self.m) or self.m < 1):
            raise ValueError(
                f"`m` (examples per ε) must be None (the whole per-device batch) or an integer >= 1, got {self.m!r}."
            )
        if not isinstance(self.log, bool):
            raise TypeError(f"`log` must be a bool, got {self.log!r}.")
        if not isinstance(self.same_randomness, bool):
            raise TypeError(f"`same_randomness` must be a bool, got {self.same_randomness!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SAMConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def diff(self, other: SAMConfig) -> dict[str, tuple[Any, Any]]:
        """The settings that differ, as ``{name: (self's, other's)}``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def validate_param_groups(param_groups: Iterable[Mapping[str, Any]], config: SAMConfig) -> None:
    """Check each param group's own ``rho`` / ``adaptive`` / ``eta`` as the constructor checks the defaults."""
    for index, group in enumerate(param_groups):
        try:
            SAMConfig(
                rho=group.get("rho", config.rho),
                adaptive=group.get("adaptive", config.adaptive),
                eta=group.get("eta", config.eta),
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"Param group {index} of the optimizer: {error}") from None


def validate_rho(rho: Any, where: str = "`rho`") -> None:
    if not _is_real(rho) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(
            f"{where} must be a finite number > 0 (the radius of the SAM neighbourhood, 0.05 in the paper),"
            f" got {rho!r}."
        )


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
