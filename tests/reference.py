"""Independent reference computations for SAM, written from the paper's formulas with plain per-tensor loops.

Nothing here imports lightning_sam: the tests compare the library against these.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call


def linreg_grads(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Analytic gradient of L = mean((x @ w.T + b - y)^2) for a Linear(d, 1): by hand, no autograd."""
    r = (x @ w.T).squeeze(-1) + b - y  # residuals, shape (n,)
    n = x.shape[0]
    return (2.0 / n) * (r @ x).unsqueeze(0), (2.0 / n) * r.sum().reshape(1)


def linreg_loss(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return (((x @ w.T).squeeze(-1) + b - y) ** 2).mean()


def sam_epsilon(
    params: list[Tensor],
    grads: list[Tensor],
    rhos: list[float],
    adaptive: bool = False,
    eta: float = 0.01,
    epsilon: float = 1e-12,
) -> list[Tensor]:
    """ε = ρ·g/(‖g‖+epsilon), or ASAM's ρ·T²g/(‖T·g‖+epsilon) with T = |w|+eta, in float64."""
    ts = [(p.double().abs() + eta) if adaptive else torch.ones_like(p, dtype=torch.float64) for p in params]
    norm = torch.sqrt(sum(((t * g.double()) ** 2).sum() for t, g in zip(ts, grads)))
    if norm == 0:
        return [torch.zeros_like(p) for p in params]
    return [(rho * t * t * g.double() / (norm + epsilon)).to(p.dtype) for rho, t, g, p in zip(rhos, ts, grads, params)]


def linreg_sam_sgd(
    w: Tensor,
    b: Tensor,
    batches: list[tuple[Tensor, Tensor]],
    lr: float,
    rho_w: float,
    rho_b: float | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    interval: int = 1,
    clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain SGD with SAM on linear regression, by hand. Returns the final (w, b)."""
    rho_b = rho_w if rho_b is None else rho_b
    w, b = w.clone(), b.clone()
    for step, (x, y) in enumerate(batches):
        gw, gb = linreg_grads(w, b, x, y)
        if step % interval == 0:
            ew, eb = sam_epsilon([w, b], [gw, gb], [rho_w, rho_b], adaptive=adaptive, eta=eta)
            gw, gb = linreg_grads(w + ew, b + eb, x, y)
        if clip is not None:
            norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
            coef = min(1.0, clip / (float(norm) + 1e-6))
            gw, gb = gw * coef, gb * coef
        w, b = w - lr * gw, b - lr * gb
    return w, b


def functional_sam_grads(
    model: torch.nn.Module, loss_fn, batch, rho: float, adaptive: bool = False, eta: float = 0.01
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """For any model: (∇L(w+ε) by name, L(w), L(w+ε), ‖g‖), evaluating w+ε with functional_call (no in-place)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def loss_at(values: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, ({**params, **values}, buffers), (batch[0],)), batch[1])

    leaves = {n: params[n].clone().requires_grad_(True) for n in names}
    loss = loss_at(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    present = [(n, g) for n, g in zip(names, grads) if g is not None]
    eps = sam_epsilon([params[n] for n, _ in present], [g for _, g in present], [rho] * len(present), adaptive, eta)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for _, g in present))
    shifted = {n: (params[n] + e).requires_grad_(True) for (n, _), e in zip(present, eps)}
    perturbed_loss = loss_at(shifted)
    grads2 = torch.autograd.grad(perturbed_loss, list(shifted.values()))
    return dict(zip(shifted, grads2)), loss.detach(), perturbed_loss.detach(), norm
