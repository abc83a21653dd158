"""The variant engine's extension point: where a SAM variant differs from plain SAM.

A variant differs from SAM in four places, each a method here with plain SAM's behaviour as the default:

- *when* the second pass runs: ``plan`` (per optimizer step, decided on the host before any pass) and, for a
  variant that looks at the first-pass gradient first, ``decide``;
- *where* it climbs: ``first_pass_params`` (which parameters get a first-pass gradient), ``perturb`` (ε from the
  gradient) and ``climb`` (ε from the optimizer state, before the only forward: MSAM);
- *which examples* the second pass uses: ``select_examples``;
- *how the final gradient is formed*: ``combine`` (from g at w and g_s at w + ε) and ``plain`` (from g alone, on
  steps without a second pass).

Every face (the ``SAM`` callback, ``SAMModule``, ``SAMOptimizer``) runs these methods through the same code, so a
variant is written once. A variant's state (running statistics, stored vectors, its RNG) is its ``state_dict``,
saved in checkpoints by the face that owns it. Gradients reach the methods unscaled (fp16 loss scale removed), as
lists aligned with the parameters of the optimizer's groups; entries may be ``None`` (no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.perturbation import (
    Perturbation,
    PerturbGroup,
    grad_norm,
    groups_from_optimizer,
    norm_dtype,
    perturb_,
)

Grads = list[Optional[Tensor]]


class Variant:
    """Plain SAM, and ASAM where the settings (or a param group) say ``adaptive``: the engine's default variant.

    Subclasses override only what they change. ``bind`` is called once the optimizer is known (at ``on_fit_start``
    for the Lightning faces, at construction for ``SAMOptimizer``) and raises for a combination the variant cannot
    run, naming the fix.
    """

    keeps_first_gradient = False
    """``combine`` needs g at w: the engine keeps a copy before ε is computed in place (one parameter-sized buffer)."""
    climbs_before_forward = False
    """ε comes from the optimizer state, not from a first pass: one forward-backward per step, at w + ε (MSAM)."""
    needs_example_losses = False
    """``select_examples`` needs the per-example losses (``training_step`` returns them under ``"losses"``)."""
    supports_distributed = True
    """False where the variant would need a collective beyond DDP's one all-reduce per step."""
    modifies_plain_gradient = False
    """``plain`` changes the gradient of steps without a second pass (then those take it through the engine)."""
    supports_chunks = True
    """False where ``m`` (several ε per batch) has no meaning for the variant."""

    rho_schedule: Optional[Any] = None
    """A ``RhoSchedule``: ρ_t per step (or per learning rate); ``None``: the run's ρ throughout."""

    def bind(self, optimizer: Optimizer) -> None:
        """Check the base optimizer (and remember what the variant needs of it)."""

    def bind_model(self, model: Any) -> None:
        """The module being trained, for variants that select parameters by module or name (SAM-ON)."""

    def groups(self, param_groups: Sequence[dict[str, Any]], config: Any, step: int) -> list[PerturbGroup]:
        """The optimizer's param groups as ``PerturbGroup``s, each ρ scaled by the ρ schedule at ``step``."""
        groups = groups_from_optimizer(param_groups, config)
        factor = self.rho_factor(step, param_groups[0], config.rho)
        return groups if factor == 1.0 else [replace(g, rho=g.rho * factor) for g in groups]

    def rho_factor(self, step: int, group: dict[str, Any], rho: float) -> float:
        """ρ_t / ρ for step ``step``, given the first param group (its ``lr``, and the ``initial_lr`` a torch LR
        scheduler records: the peak of a warm-up): the factor every param group's ρ is scaled by."""
        if self.rho_schedule is None:
            return 1.0
        return self.rho_schedule(step, float(group["lr"]), group.get("initial_lr")) / rho

    # ---------------------------------------------------------------- when
    def plan(self, step: int) -> Optional[bool]:
        """Run the second pass on optimizer step ``step`` (counted from 0)? ``None``: decide from g (``decide``)."""
        return True

    def decide(self, step: int, grad_sq_norm: Tensor) -> bool:
        """For ``plan(step) is None``: the decision from ‖g‖² of the first pass (reads one value on the host)."""
        return True

    # ---------------------------------------------------------------- where
    def first_pass_params(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The parameters that get a first-pass gradient (and so an ε); all by default."""
        return list(params)

    def perturb(self, groups: Sequence[PerturbGroup], epsilon: float, guard_nonfinite: bool) -> Optional[Perturbation]:
        """w -> w + ε from the groups' gradients (consumed). Plain SAM / ASAM."""
        return perturb_(groups, epsilon, guard_nonfinite=guard_nonfinite)

    def climb(self, groups: Sequence[PerturbGroup], optimizer: Optimizer, epsilon: float) -> Optional[Perturbation]:
        """For ``climbs_before_forward``: w -> w + ε from the optimizer state."""
        raise NotImplementedError

    # ---------------------------------------------------------------- which examples
    def select_examples(self, losses_at_w: Tensor, losses_perturbed: Tensor) -> Optional[Tensor]:
        """Indices of the examples the second pass back-propagates; ``None`` for all."""
        return None

    # ---------------------------------------------------------------- how combined
    def combine(self, grads_at_w: Optional[Grads], grads_perturbed: Grads) -> Grads:
        """The final gradient of a SAM step (may work in place). Plain SAM: the gradient at w + ε as it is."""
        return grads_perturbed

    def plain(self, grads: Grads) -> Optional[Grads]:
        """The final gradient of a step without a second pass; ``None``: the gradient at w as it is, untouched (the
        engine then lets the loss's own backward produce it, at no extra cost)."""
        return None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def full_state_dict(self) -> dict[str, Any]:
        """The variant's state and its ρ schedule's: what a checkpoint keeps."""
        schedule = {} if self.rho_schedule is None else self.rho_schedule.state_dict()
        return {"variant": self.state_dict(), "rho_schedule": schedule}

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        if "variant" not in state:  # the variant's own state alone
            self.load_state_dict(state)
            return
        self.load_state_dict(state["variant"])
        if self.rho_schedule is not None:
            self.rho_schedule.load_state_dict(state.get("rho_schedule", {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._arguments().items())
        return f"{type(self).__name__}({args})"

    def _arguments(self) -> dict[str, Any]:
        return {}


class SAM(Variant):
    """Plain SAM (Foret et al., 2020): ε = ρ·g/‖g‖; ASAM where the settings or a param group say ``adaptive``.

    Args:
        rho_schedule: An optional ρ schedule (``lightning_sam.variants.LinearRho``, ``CosineRho``, ``LRTiedRho``).
    """

    def __init__(self, rho_schedule: Optional[Any] = None) -> None:
        self.rho_schedule = rho_schedule

    def _arguments(self) -> dict[str, Any]:
        return {} if self.rho_schedule is None else {"rho_schedule": self.rho_schedule}


class ASAM(Variant):
    """ASAM (Kwon et al., 2021): ε = ρ·T²g/‖T·g‖ with T = |w| + eta, for every param group.

    The same as ``SAM()`` with ``adaptive=True``.

    Args:
        eta: The offset in T = |w| + eta; ``None`` keeps the run's (and each param group's own ``"eta"``).
    """

    def __init__(self, eta: Optional[float] = None, rho_schedule: Optional[Any] = None) -> None:
        if eta is not None:
            check_non_negative("eta", eta)
        self.eta = None if eta is None else float(eta)
        self.rho_schedule = rho_schedule

    def perturb(self, groups: Sequence[PerturbGroup], epsilon: float, guard_nonfinite: bool) -> Optional[Perturbation]:
        groups = [replace(g, adaptive=True, eta=g.eta if self.eta is None else self.eta) for g in groups]
        return perturb_(groups, epsilon, guard_nonfinite=guard_nonfinite)

    def _arguments(self) -> dict[str, Any]:
        return {"eta": self.eta}


class SeededDraws:
    """A variant's own random draws: a CPU generator (never the global RNG, never a device sync), seeded the same on
    every rank, whose state is the variant's checkpointed state."""

    def _seed(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


def present(tensors: Sequence[Optional[Tensor]]) -> list[Tensor]:
    return [t for t in tensors if t is not None]


def dot(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]]) -> Tensor:
    """Σ a·b over the pairs where both are present, in float32 (float64 for float64), on the device (no host sync)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    dtype = norm_dtype([x for x, _ in pairs])
    products = torch._foreach_mul([x.to(dtype) for x, _ in pairs], [y.to(dtype) for _, y in pairs])
    return torch.stack([p.sum() for p in products]).sum()


def sq_norm(tensors: Sequence[Optional[Tensor]]) -> Tensor:
    return grad_norm(present(tensors)).square()


def axpy_(y: Sequence[Optional[Tensor]], a: Tensor, x: Sequence[Optional[Tensor]]) -> None:
    """y += a·x in place, with ``a`` a device scalar."""
    pairs = [(t, s) for t, s in zip(y, x) if t is not None and s is not None]
    if pairs:
        torch._foreach_add_([t for t, _ in pairs], torch._foreach_mul([s for _, s in pairs], a))


def check_fraction(name: str, value: Any, allow_zero: bool = False) -> None:
    low = "[0, 1]" if allow_zero else "(0, 1]"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not ((0 <= value <= 1) if allow_zero else (0 < value <= 1))
    ):
        raise ValueError(f"`{name}` must be a number in {low}, got {value!r}.")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def check_non_negative(name: str, value: Any) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")


def generator_state(generator: torch.Generator) -> Tensor:
    return generator.get_state()


def new_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
