"""The math of SAM and ASAM, in one place: ε from the gradients, perturb, restore.

Pure ``torch``: no Lightning, no state between calls. Every entry point (the ``SAM`` callback, ``SAMModule`` and
``SAMOptimizer``) goes through ``perturb_`` and ``restore_``. The work is done with multi-tensor
(``torch._foreach_*``) kernels and never reads a value back to the host, so a step issues no host-device sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sam.config import SAMConfig


@dataclass
class PerturbGroup:
    """The parameters that share one ``rho`` / ``adaptive`` / ``eta`` (one optimizer param group)."""

    params: Sequence[Tensor]
    rho: float
    adaptive: bool = False
    eta: float = 0.01
    grads: Optional[Sequence[Optional[Tensor]]] = None
    """The gradients ε is made from, aligned with ``params``; ``None`` reads each ``p.grad``."""


@dataclass
class Perturbation:
    """A perturbation in force: the weights are at w + ε and ``backup`` holds w, bit for bit."""

    params: list[Tensor]
    backup: list[Tensor]
    grad_norm: Tensor
    """‖g‖ (SAM) or ‖T·g‖ (ASAM) of the gradients ε was made from, as they were (loss-scaled under fp16)."""
    finite: Tensor
    """False when that norm was not finite: then ε = 0 and the weights were not moved."""


def groups_from_optimizer(param_groups: Iterable[dict[str, Any]], config: SAMConfig) -> list[PerturbGroup]:
    """One ``PerturbGroup`` per optimizer param group; a group's own ``rho`` / ``adaptive`` / ``eta`` keys win."""
    return [
        PerturbGroup(
            params=group["params"],
            rho=group.get("rho", config.rho),
            adaptive=group.get("adaptive", config.adaptive),
            eta=group.get("eta", config.eta),
        )
        for group in param_groups
    ]


def check_parameters(module: torch.nn.Module) -> None:
    """Refuse, before any step, the parameters SAM cannot perturb correctly."""
    for name, submodule in module.named_modules():
        if isinstance(submodule, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and submodule.sparse:
            if submodule.weight.requires_grad:
                raise ValueError(
                    f"`{name or type(submodule).__name__}` has `sparse=True`: SAM does not support sparse gradients"
                    " (ε is dense). Use `sparse=False`."
                )
    hooked = [name for name, p in module.named_parameters() if p.requires_grad and getattr(p, "_backward_hooks", None)]
    if hooked:
        raise ValueError(
            f"Gradient hooks are registered on {hooked[:3]} (`p.register_hook`). SAM computes the gradient twice per"
            " step and hands the final one to the backward, so such a hook would run three times and change the"
            " final gradient twice. Change gradients in `on_after_backward` or `on_before_optimizer_step` instead."
        )


def norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float32 for the norms of low-precision and float32 tensors, float64 where any is float64 (no narrowing)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def grad_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` taken together, in float32 (float64 for float64 tensors), on their device."""
    norms = torch._foreach_norm(tensors, 2, dtype=norm_dtype(tensors))
    return torch.linalg.vector_norm(torch.stack(norms), 2)


@torch.no_grad()
def perturb_(
    groups: Sequence[PerturbGroup], epsilon: float = 1e-12, guard_nonfinite: bool = False
) -> Optional[Perturbation]:
    """Move every parameter that has a gradient from w to w + ε, in place; return what restores it.

    The gradients are each group's ``grads`` when given (e.g. from ``torch.autograd.grad``, leaving ``.grad`` alone),
    else the parameters' ``.grad``.

    ε = ρ·g/(‖g‖ + epsilon) for plain SAM and ε = ρ·T²g/(‖T·g‖ + epsilon) with T = |w| + eta for adaptive groups,
    where the norm runs over all parameters of all groups and ρ is each group's own. Parameters whose gradient is
    ``None`` (frozen, unused) are left untouched. A zero gradient gives ε = 0. ε is invariant to a common scale of
    the gradients, so loss-scaled fp16 gradients need no unscaling.

    With ``guard_nonfinite`` (set it under an fp16 loss scaler, where an overflow is an expected event), a
    non-finite norm gives ε = 0 and leaves the weights where they are; ``finite`` reports it. Without it, a
    non-finite gradient moves the weights to NaN until ``restore_``, as it would poison a plain step anyway.

    The gradients (each group's ``grads``, else ``p.grad``) are consumed: on return they hold ε. Extra memory: one
    parameter-sized buffer, the backup of w (for ASAM it first holds T).

    Returns:
        The ``Perturbation`` to hand to ``restore_``, or ``None`` if no parameter has a gradient.
    """
    selected = []
    for group in groups:
        grads = group.grads if group.grads is not None else [p.grad for p in group.params]
        pairs = [(p, g) for p, g in zip(group.params, grads) if g is not None]
        if pairs:
            selected.append((group, [p for p, _ in pairs], [g for _, g in pairs]))
    if not selected:
        return None
    for _, _, grads in selected:
        for g in grads:
            if g.is_sparse:
                raise RuntimeError("SAM does not support sparse gradients; use a dense embedding.")

    # ASAM: g <- T·g now, and T·(T·g) below, so the norm is ‖T·g‖ and ε is proportional to T²g.
    scales: dict[int, list[Tensor]] = {}
    for index, (group, params, grads) in enumerate(selected):
        if group.adaptive:
            t = torch._foreach_abs(params)
            torch._foreach_add_(t, group.eta)
            torch._foreach_mul_(grads, t)
            scales[index] = t

    all_params = [p for _, params, _ in selected for p in params]
    all_grads = [g for _, _, grads in selected for g in grads]
    norm = grad_norm(all_grads)
    finite = torch.isfinite(norm)
    if guard_nonfinite:
        _ones_if_not(finite, all_grads)
    # ε = 0 for a zero or non-finite norm, so neither epsilon=0 nor an overflow can produce NaN.
    inv_norm = torch.where(finite & (norm > 0), 1.0 / (norm + epsilon), 0.0)

    backup: list[Tensor] = []
    for index, (group, params, grads) in enumerate(selected):
        t = scales.get(index)
        if t is not None:
            torch._foreach_mul_(grads, t)
            torch._foreach_copy_(t, params)  # T is spent: its storage becomes the backup of w
            backup.extend(t)
        else:
            backup.extend(torch._foreach_clone(params))
        torch._foreach_mul_(grads, inv_norm * group.rho)
    torch._foreach_add_(all_params, all_grads)
    return Perturbation(params=all_params, backup=backup, grad_norm=norm, finite=finite)


def _ones_if_not(keep: Tensor, tensors: list[Tensor]) -> None:
    """``tensors`` unchanged if ``keep`` else all ones, in place, without reading ``keep`` on the host.

    pow(x, 1) == x and pow(x, 0) == 1 for every x, inf and NaN included: the zero scale applied afterwards then
    wipes the ones out. (No foreach op takes a device scalar exponent, hence one expanded view per tensor.)
    """
    exponents = {dtype: keep.to(dtype) for dtype in {t.dtype for t in tensors}}
    torch._foreach_pow_(tensors, [exponents[t.dtype].expand_as(t) for t in tensors])


@torch.no_grad()
def restore_(perturbation: Perturbation) -> None:
    """Put the weights back to w exactly, by copying the backup (never by subtracting ε)."""
    torch._foreach_copy_(perturbation.params, perturbation.backup)
