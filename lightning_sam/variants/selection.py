"""Which parameters SAM perturbs: SAM-ON (Mueller et al., "Normalization Layers Are All That Sharpness-Aware
Minimization Needs", NeurIPS 2023) and, more generally, a selection by module type, name pattern or predicate."""

from __future__ import annotations

import re
from dataclasses import replace
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

from lightning_sam.variants.base import Variant
from lightning_sam.variants.schedules import RhoSchedule

NORMALIZATION_LAYERS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LayerNorm", "GroupNorm")


class ParamSelection:
    """Selects parameters by the type of the module that owns them, by name, or by a predicate (any one suffices).

    Args:
        module_types: Module classes, or their names in ``torch.nn`` (``"BatchNorm2d"``, for YAML); subclasses count.
        name_pattern: A regular expression searched in each parameter's qualified name (``"bias$"``).
        predicate: ``predicate(name, parameter) -> bool``.

    Raises:
        ValueError: with no criterion, or an unknown module type.
    """

    def __init__(
        self,
        module_types: Sequence[Union[str, type]] = (),
        name_pattern: Optional[str] = None,
        predicate: Optional[Callable[[str, Tensor], bool]] = None,
    ) -> None:
        if not module_types and name_pattern is None and predicate is None:
            raise ValueError("A `ParamSelection` needs `module_types`, `name_pattern` or `predicate`.")
        self.module_types = tuple(_module_type(t) for t in module_types)
        self.name_pattern = None if name_pattern is None else re.compile(name_pattern)
        self.predicate = predicate

    def select(self, model: nn.Module) -> list[Tensor]:
        chosen: dict[int, Tensor] = {}
        for module_name, module in model.named_modules():
            owned = isinstance(module, self.module_types) if self.module_types else False
            for name, p in module.named_parameters(prefix=module_name, recurse=False):
                if owned or (self.name_pattern is not None and self.name_pattern.search(name)):
                    chosen[id(p)] = p
                elif self.predicate is not None and self.predicate(name, p):
                    chosen[id(p)] = p
        if not chosen:
            raise ValueError(
                f"{self!r} matches no parameter of {type(model).__name__}: SAM would perturb nothing. Check the module"
                " types and the name pattern against `model.named_parameters()`."
            )
        return list(chosen.values())

    def __repr__(self) -> str:
        types = [t.__name__ for t in self.module_types]
        pattern = None if self.name_pattern is None else self.name_pattern.pattern
        return f"ParamSelection(module_types={types}, name_pattern={pattern!r}, predicate={self.predicate!r})"


def _module_type(value: Union[str, type]) -> type:
    if isinstance(value, type) and issubclass(value, nn.Module):
        return value
    if isinstance(value, str):
        found = getattr(nn, value, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
    raise ValueError(
        f"Unknown module type {value!r}: give a `torch.nn.Module` subclass or the name of one in torch.nn."
    )


class SAMON(Variant):
    """SAM on a subset of the parameters; by default SAM-ON's: the affine parameters of normalization layers.

    Only the selected parameters get a first-pass gradient (the first backward skips the others' weight gradients)
    and an ε; the norm runs over them alone; the others stay at w in the second pass and step with their gradient
    at w + ε like all. The paper pairs it with a larger ρ than SAM's. The selection is resolved against the module
    at fit start (``SAMOptimizer``: pass ``model=``); a selection that matches nothing is refused then.

    Args:
        selection: Which parameters; default: those of BatchNorm, SyncBatchNorm, LayerNorm and GroupNorm layers.
        adaptive: ASAM's scaling on the selected parameters (SAM-ON reports it works well with ASAM).
        rho_schedule: An optional ρ schedule.
    """

    def __init__(
        self,
        selection: Optional[ParamSelection] = None,
        adaptive: bool = False,
        rho_schedule: Optional[RhoSchedule] = None,
    ) -> None:
        self.selection = selection or ParamSelection(module_types=NORMALIZATION_LAYERS)
        self.adaptive = bool(adaptive)
        self.rho_schedule = rho_schedule
        self._selected: Optional[set[int]] = None

    def bind(self, optimizer) -> None:
        self._optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}

    def bind_model(self, model: nn.Module) -> None:
        optimized = getattr(self, "_optimized", None)
        self._selected = {
            id(p) for p in self.selection.select(model) if p.requires_grad and (optimized is None or id(p) in optimized)
        }
        if not self._selected:
            raise ValueError(
                f"{self.selection!r} selects no parameter that is trained by the optimizer: SAM would perturb nothing."
                " Select parameters that require grad and are in the optimizer's param groups."
            )

    def first_pass_params(self, params: Sequence[Tensor]) -> list[Tensor]:
        if self._selected is None:
            raise RuntimeError(
                "SAMON needs the model to resolve its selection: with SAMOptimizer, pass `model=` (the Lightning faces"
                " do it at fit start)."
            )
        return [p for p in params if id(p) in self._selected]

    def perturb(self, groups, epsilon: float, guard_nonfinite: bool):
        from lightning_sam.perturbation import perturb_

        if self.adaptive:
            groups = [replace(g, adaptive=True) for g in groups]
        return perturb_(groups, epsilon, guard_nonfinite=guard_nonfinite)

    def _arguments(self) -> dict[str, Any]:
        return {"selection": self.selection, "adaptive": self.adaptive}
