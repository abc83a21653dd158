"""m-sharpness (Foret et al., 2020, section 4.1): the loss increase at SAM's worst-case point, per chunk of m."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_sam.diagnostics._common import (
    LossFn,
    batch_size_of,
    check_int,
    check_loss_fn,
    check_positive,
    materialize_batches,
    scalar_loss,
    split_batch,
    trainable_params,
)
from lightning_sam.diagnostics._state import preserved_state


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    rho: float = 0.05,
    m: Optional[int] = None,
    adaptive: bool = False,
    eta: float = 0.01,
    epsilon: float = 1e-12,
    eval_mode: bool = True,
) -> float:
    r"""The m-sharpness of the model: the loss increase at SAM's first-order worst point, per chunk of ``m``.

    Each batch is cut along dim 0 into chunks of ``m`` examples (the last chunk of a batch may be smaller). For each
    chunk c with loss L_c and gradient g_c = ∇L_c(w)::

        ε̂_c = ρ · g_c / (‖g_c‖ + epsilon)                 (SAM)
        ε̂_c = ρ · T² g_c / (‖T g_c‖ + epsilon), T = |w| + η  (ASAM, ``adaptive=True``)
        s_c = L_c(w + ε̂_c) − L_c(w)

    and the result is Σ_c n_c s_c / Σ_c n_c, the mean over all chunks of all batches weighted by their sizes n_c.
    This is the ε of ``lightning_sam.perturbation.perturb_`` (the SAM step's), with the norm over all parameters
    with ``requires_grad``, computed here in the parameters' own dtype (``perturb_`` takes its norm in float32,
    which would refuse float64 models). ``m=None`` takes each whole batch as one chunk. A zero gradient
    gives ε̂ = 0 and a sharpness of 0 for that chunk.

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss of a batch (called on each chunk).
        batches: An iterable of batches (read once).
        rho: The radius ρ (> 0).
        m: Examples per ε̂; ``None``: one ε̂ per batch.
        adaptive: ASAM's scale-invariant ε̂.
        eta: ASAM's offset η.
        epsilon: Added to the norm.
        eval_mode: Evaluate in eval mode (BatchNorm on its running statistics, no dropout); ``False``: train mode,
            with the running statistics restored afterwards.

    Returns:
        The m-sharpness, a Python float.

    Example:

        s = sharpness(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, rho=0.05, m=16)
    """
    params = trainable_params(model)
    check_loss_fn(loss_fn)
    check_positive("rho", rho)
    check_positive("eta", eta, allow_zero=True)
    check_positive("epsilon", epsilon, allow_zero=True)
    if m is not None:
        check_int("m", m)
    if not isinstance(adaptive, bool):
        raise ValueError(f"`adaptive` must be a bool, got {adaptive!r}.")
    batch_list = materialize_batches(batches)
    total, weight = 0.0, 0
    with preserved_state(model, eval_mode=eval_mode):
        for batch in batch_list:
            chunks = split_batch(batch, m) if m is not None else [(batch, batch_size_of(batch))]
            for chunk, size in chunks:
                with torch.enable_grad():
                    loss = scalar_loss(loss_fn, model, chunk)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    moved = [(p, g) for p, g in zip(params, grads) if g is not None]
                    backup = [p.detach().clone() for p, _ in moved]
                    eps = epsilon_hat([p for p, _ in moved], [g for _, g in moved], rho, adaptive, eta, epsilon)
                    torch._foreach_add_([p for p, _ in moved], eps)
                    perturbed = scalar_loss(loss_fn, model, chunk)
                    torch._foreach_copy_([p for p, _ in moved], backup)  # back to w exactly
                total += size * float(perturbed.detach() - loss.detach())
                weight += size
    return total / weight


@torch.no_grad()
def epsilon_hat(
    params: list[Tensor],
    grads: list[Tensor],
    rho: float,
    adaptive: bool = False,
    eta: float = 0.01,
    epsilon: float = 1e-12,
) -> list[Tensor]:
    """ε̂ = ρ·g/(‖g‖ + epsilon), or ρ·T²g/(‖T·g‖ + epsilon) with T = |w| + eta (ASAM); 0 for a zero gradient.

    The same formula as ``lightning_sam.perturbation.perturb_`` (a test checks they agree), without touching
    ``.grad`` and in the parameters' dtype.
    """
    if not grads:
        return []
    if adaptive:
        t = torch._foreach_add(torch._foreach_abs(params), eta)
        tg = torch._foreach_mul(grads, t)
    else:
        t, tg = None, list(grads)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tg, 2)), 2)
    scale = torch.where(norm > 0, rho / (norm + epsilon), torch.zeros_like(norm))
    eps = torch._foreach_mul(tg, t) if t is not None else [g.clone() for g in grads]
    torch._foreach_mul_(eps, scale)
    return eps
