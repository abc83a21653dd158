"""Loss-landscape slices around the weights (Li et al., 2018) and the linear path between two models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_sam.diagnostics._common import (
    LossFn,
    check_int,
    check_loss_fn,
    materialize_batches,
    scalar_loss,
    trainable_params,
)
from lightning_sam.diagnostics._state import preserved_state


def filter_normalized_direction(
    model: nn.Module, seed: int = 0, ignore_1d: bool = True, generator: Optional[torch.Generator] = None
) -> list[Tensor]:
    """A random direction d (one tensor per parameter with ``requires_grad``), filter-normalized.

    d is drawn from N(0, 1); then, for every parameter of 2 or more dimensions and every filter i (a slice along
    dim 0: an output unit of a linear layer, an output channel of a convolution), d_i ← d_i · ‖w_i‖ / ‖d_i‖ (Li et
    al., 2018, eq. 2), so the direction has the scale of each filter and the plot ignores the scale invariance that
    BatchNorm and ReLU give. Parameters of 0 or 1 dimension (biases, BatchNorm's affine) get d = 0 with
    ``ignore_1d`` (the paper's default), else d ← d · ‖w‖ / ‖d‖ over the whole tensor.

    Args:
        model: The model whose parameters set the shapes and the filter norms.
        seed: Seed of a private generator (the global RNG is not used).
        ignore_1d: Zero direction for 0-d and 1-d parameters.
        generator: Use this generator instead of ``seed`` (to draw several directions in a row).

    Returns:
        A list of tensors, each of its parameter's shape, dtype and device.
    """
    params = trainable_params(model)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    direction = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        w = p.detach().to(torch.float64).cpu()
        if p.dim() <= 1:
            if ignore_1d:
                d.zero_()
            else:
                d.mul_(w.norm() / d.norm().clamp_min(1e-30))
        else:
            w_norm = w.flatten(1).norm(dim=1)
            d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-30)
            d.mul_((w_norm / d_norm).view(-1, *([1] * (p.dim() - 1))))
        direction.append(d.to(dtype=p.dtype, device=p.device))
    return direction


@dataclass
class Landscape:
    """Loss values on a line or a plane through w: L(w + α d₁) or L(w + α d₁ + β d₂).

    Attributes:
        alphas: Coordinates along d₁.
        betas: Coordinates along d₂ (``None`` for a 1-D slice).
        losses: ``(len(alphas),)`` or ``(len(alphas), len(betas))`` losses (float64).
        directions: The directions used (one list of tensors per axis).
    """

    alphas: Tensor
    betas: Optional[Tensor]
    losses: Tensor
    directions: list[list[Tensor]]


def _snapped(grid: Tensor, points: tuple[float, ...]) -> Tensor:
    """``grid`` with values within rounding of ``points`` set to them exactly (so the origin is the weights)."""
    tolerance = 1e-9 * float(grid[-1] - grid[0])
    for point in points:
        grid[(grid - point).abs() < tolerance] = point
    return grid


def _mean_loss(model: nn.Module, loss_fn: LossFn, batches: list[Any]) -> float:
    with torch.no_grad():
        return sum(float(scalar_loss(loss_fn, model, b)) for b in batches) / len(batches)


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    dims: int = 1,
    steps: int = 21,
    span: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    directions: Optional[Sequence[Sequence[Tensor]]] = None,
    ignore_1d: bool = True,
    eval_mode: bool = True,
) -> Landscape:
    """The mean loss over ``batches`` on a 1-D or 2-D slice through the weights w.

    L(α) = L(w + α d₁) (``dims=1``) or L(α, β) = L(w + α d₁ + β d₂) (``dims=2``) for α, β on ``steps`` evenly
    spaced points of ``span``; d₁, d₂ are ``filter_normalized_direction``s drawn from one generator seeded with
    ``seed``, unless ``directions`` are given. Include 0 in the grid (an odd ``steps`` with a symmetric span) to
    have L(w) at the centre.

    Args:
        model: Any ``nn.Module``; only parameters with ``requires_grad`` move.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: An iterable of batches (read once); the loss is their mean.
        dims: 1 or 2.
        steps: Points per axis (>= 2).
        span: ``(low, high)`` coordinates along each direction, in units of the (filter-normalized) direction.
        seed: Seed of the directions.
        directions: ``dims`` directions, each a list of tensors shaped like the parameters with ``requires_grad``.
        ignore_1d: See ``filter_normalized_direction``.
        eval_mode: Evaluate in eval mode (BatchNorm on its running statistics).

    Returns:
        A ``Landscape``.

    Example:

        slice_1d = loss_landscape(model, loss_fn, batches, dims=1, steps=41)
        plot_landscape_1d({"SAM": slice_1d})
    """
    params = trainable_params(model)
    check_loss_fn(loss_fn)
    if dims not in (1, 2):
        raise ValueError(f"`dims` must be 1 or 2, got {dims!r}.")
    check_int("steps", steps, minimum=2)
    low, high = span
    if not float(low) < float(high):
        raise ValueError(f"`span` must be (low, high) with low < high, got {span!r}.")
    batch_list = materialize_batches(batches)
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = [filter_normalized_direction(model, ignore_1d=ignore_1d, generator=generator) for _ in range(dims)]
    else:
        if len(directions) != dims:
            raise ValueError(f"`directions` must hold {dims} direction(s), got {len(directions)}.")
        for d in directions:
            if len(d) != len(params) or any(t.shape != p.shape for t, p in zip(d, params)):
                raise ValueError(
                    "each direction must be a list of tensors shaped like the parameters with requires_grad."
                )
    directions = [[t.to(dtype=p.dtype, device=p.device) for t, p in zip(d, params)] for d in directions]
    alphas = _snapped(torch.linspace(float(low), float(high), steps, dtype=torch.float64), (0.0,))
    betas = alphas.clone() if dims == 2 else None
    losses = torch.empty((steps, steps) if dims == 2 else (steps,), dtype=torch.float64)
    with preserved_state(model, eval_mode=eval_mode), torch.no_grad():
        origin = [p.detach().clone() for p in params]
        for i, a in enumerate(alphas.tolist()):
            for j, b in enumerate(betas.tolist() if betas is not None else [None]):
                torch._foreach_copy_(params, origin)
                torch._foreach_add_(params, directions[0], alpha=a)
                if b is not None:
                    torch._foreach_add_(params, directions[1], alpha=b)
                losses[(i, j) if b is not None else i] = _mean_loss(model, loss_fn, batch_list)
    return Landscape(alphas, betas, losses, directions)


@dataclass
class LinearPath:
    """Losses on the segment (and beyond) between two models: L((1 − t)·w_a + t·w_b).

    Attributes:
        ts: The interpolation coefficients (0: model a, 1: model b).
        losses: ``(len(ts),)`` losses (float64).
    """

    ts: Tensor
    losses: Tensor


def linear_path(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    steps: int = 21,
    span: tuple[float, float] = (0.0, 1.0),
    eval_mode: bool = True,
) -> LinearPath:
    """The mean loss over ``batches`` along the straight line from ``model_a`` (t = 0) to ``model_b`` (t = 1).

    Every parameter with ``requires_grad`` is interpolated, (1 − t)·a + t·b, and so is every floating-point buffer
    (BatchNorm's running statistics) for t in [0, 1] (outside, the buffers stay those of the nearer end, since an
    extrapolated variance can be negative); the loss is evaluated on ``model_a`` moved to each point (it is put back
    exactly afterwards; ``model_b`` is only read). For example, an SGD and a SAM checkpoint of the same network:
    a barrier between them, and the side on which the loss rises faster.

    Args:
        model_a: The model at t = 0 (evaluated on).
        model_b: The model at t = 1: the same architecture.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: An iterable of batches (read once).
        steps: Points (>= 2).
        span: ``(low, high)`` range of t; e.g. ``(-0.5, 1.5)`` to look past both ends.
        eval_mode: Evaluate in eval mode.

    Returns:
        A ``LinearPath``.
    """
    params_a = trainable_params(model_a)
    check_loss_fn(loss_fn)
    check_int("steps", steps, minimum=2)
    names_a = [n for n, p in model_a.named_parameters() if p.requires_grad]
    named_b = dict(model_b.named_parameters())
    if any(n not in named_b or named_b[n].shape != p.shape for n, p in zip(names_a, params_a)):
        raise ValueError("`model_a` and `model_b` must have the same parameters (names and shapes).")
    params_b = [named_b[n].detach() for n in names_a]
    buffers_b = dict(model_b.named_buffers())
    buf_pairs = [
        (b, buffers_b[n].detach())
        for n, b in model_a.named_buffers()
        if b.is_floating_point() and n in buffers_b and buffers_b[n].shape == b.shape
    ]
    batch_list = materialize_batches(batches)
    low, high = span
    if not float(low) < float(high):
        raise ValueError(f"`span` must be (low, high) with low < high, got {span!r}.")
    ts = _snapped(torch.linspace(float(low), float(high), steps, dtype=torch.float64), (0.0, 1.0))
    losses = torch.empty(steps, dtype=torch.float64)
    with preserved_state(model_a, eval_mode=eval_mode), torch.no_grad():
        origin = [p.detach().clone() for p in params_a]
        buf_origin = [b.detach().clone() for b, _ in buf_pairs]
        for i, t in enumerate(ts.tolist()):
            for p, a, b in zip(params_a, origin, params_b):
                p.copy_(torch.lerp(a, b.to(a.device, a.dtype), t))
            for (buf, b), a in zip(buf_pairs, buf_origin):
                # Beyond the ends the statistics stay those of the nearer model: extrapolated variances could go < 0.
                buf.copy_(torch.lerp(a, b.to(a.device, a.dtype), min(max(t, 0.0), 1.0)))
            losses[i] = _mean_loss(model_a, loss_fn, batch_list)
    return LinearPath(ts, losses)
