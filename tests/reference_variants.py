"""Hand references of the SAM variants: plain loops over named tensors, ``torch.func.functional_call`` for the
gradients and ``torch.optim`` for the base step. Never imports lightning_sam.

Each variant is written from its paper's update rule, as the library's docstrings state it:

- LookSAM: SAM on t % k == 0, storing g_v = g_s − (g·g_s/‖g‖²)·g; else g + α·(‖g‖/‖g_v‖)·g_v.
- RandomSAM: SAM when ``torch.rand((), generator)`` < p (one draw per step from a generator seeded with ``seed``).
- AESAM: μ ← δμ + (1−δ)‖g‖², σ² ← δσ² + (1−δ)(‖g‖² − μ)², SAM when ‖g‖² ≥ μ + c·σ (the first step: μ = ‖g‖², SAM).
- MSAM: ε = −ρ·v/‖v‖ from the base optimizer's momentum (0 before there is one); one gradient, at w + ε.
- ESAM: per step, each parameter tensor kept when ``torch.rand(n, generator)[i]`` < β; ε = ρ/β·g/‖g‖ over the kept
  ones; the second gradient is that of the mean loss over the γ·B examples whose loss rose most.
- GSAM: ρ_t = ρ_min + (ρ_max − ρ_min)·clamp(lr_t / max(lr so far), 0, 1); final g_s − α·(g − (g·g_s/‖g_s‖²)·g_s).
- Friendly-SAM: d = g (first step) or g − σ·m; m ← g (first step) or λ·m + (1 − λ)·g; ε = ρ·d/‖d‖.
- SAM-ON: ε = ρ·g/‖g‖ over the selected parameters only.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def _grads(net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, rows=None) -> dict[str, Tensor]:
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    out = functional_call(net, leaves, (x,)).squeeze(-1)
    losses = (out - y) ** 2
    loss = losses.mean() if rows is None else losses[rows].mean()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


def _losses(net: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return (functional_call(net, params, (x,)).squeeze(-1) - y) ** 2


def _norm(grads: dict[str, Tensor], names=None) -> Tensor:
    names = list(grads) if names is None else names
    return torch.sqrt(sum((grads[n].double() ** 2).sum() for n in names))


def _dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in a)


def _shift(params: dict[str, Tensor], eps: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: p + eps[n].to(p.dtype) if n in eps else p for n, p in params.items()}


def _sam_eps(grads: dict[str, Tensor], rho: float, names=None) -> dict[str, Tensor]:
    names = list(grads) if names is None else names
    norm = _norm(grads, names)
    return {n: rho * grads[n].double() / (norm + 1e-12) for n in names}


def reference_variant_run(
    net: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    variant: str,
    rho: float,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    knobs: Optional[dict] = None,
    lrs: Optional[list[float]] = None,
) -> tuple[dict[str, Tensor], list[bool]]:
    """Train a copy of ``net``'s weights over ``batches``; return the final weights and which steps were SAM.

    ``lrs``: the learning rate of each step (set on the optimizer before it), for schedules tied to the LR."""
    knobs = knobs or {}
    friendly_m: Optional[dict[str, Tensor]] = None
    seen_lr = 0.0
    names = [n for n, _ in net.named_parameters()]
    leaves = [p.detach().clone().requires_grad_(True) for _, p in net.named_parameters()]
    opt = make_optimizer(leaves)
    g_v: Optional[dict[str, Tensor]] = None
    mean, var = None, 0.0
    generator = torch.Generator().manual_seed(knobs.get("seed", 0))
    sam_steps = []
    for t, (x, y) in enumerate(batches):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        lr = opt.param_groups[0]["lr"]
        seen_lr = max(seen_lr, lr)
        params = dict(zip(names, [p.detach() for p in leaves]))
        if variant == "msam":
            momenta = {
                n: opt.state[p].get("momentum_buffer", opt.state[p].get("exp_avg")) for n, p in zip(names, leaves)
            }
            if any(v is None for v in momenta.values()):
                eps = {}
            else:
                norm = _norm(momenta)
                eps = {n: -rho * v.double() / (norm + 1e-12) for n, v in momenta.items()}
            final = _grads(net, _shift(params, eps), x, y)
            sam = True
        else:
            g = _grads(net, params, x, y)
            if variant == "looksam":
                sam = t % knobs["k"] == 0
            elif variant == "random":
                sam = torch.rand((), generator=generator).item() < knobs["p"]
            elif variant == "aesam":
                value = float(_norm(g) ** 2)
                if mean is None:
                    mean, var, sam = value, 0.0, True
                else:
                    delta = knobs.get("delta", 0.9)
                    mean = delta * mean + (1 - delta) * value
                    var = delta * var + (1 - delta) * (value - mean) ** 2
                    sam = value >= mean + knobs["c"] * var**0.5
            else:
                sam = True
            if not sam:
                final = g
                if variant == "looksam":
                    ratio = knobs["alpha"] * _norm(g) / _norm(g_v)
                    final = {n: g[n] + (ratio * g_v[n].double()).to(g[n].dtype) for n in g}
            elif variant == "esam":
                beta, gamma = knobs["beta"], knobs["gamma"]
                keep = (torch.rand(len(names), generator=generator) < beta).tolist()
                kept = [n for n, k in zip(names, keep) if k]
                eps = _sam_eps(g, rho / beta, kept) if kept else {}
                shifted = _shift(params, eps)
                rise = _losses(net, shifted, x, y) - _losses(net, params, x, y)
                rows = torch.topk(rise, max(1, int(len(y) * gamma))).indices if gamma < 1 else None
                final = _grads(net, shifted, x, y, rows)
            elif variant == "gsam":
                rho_t = knobs["rho_min"] + (knobs["rho_max"] - knobs["rho_min"]) * min(max(lr / seen_lr, 0.0), 1.0)
                g_s = _grads(net, _shift(params, _sam_eps(g, rho_t)), x, y)
                c = _dot(g, g_s) / _norm(g_s) ** 2
                final = {n: g_s[n] - knobs["alpha"] * (g[n].double() - c * g_s[n].double()).to(g_s[n].dtype) for n in g}
            elif variant == "fsam":
                if friendly_m is None:
                    d, friendly_m = dict(g), {n: v.clone() for n, v in g.items()}
                else:
                    d = {n: g[n] - knobs["sigma"] * friendly_m[n] for n in g}
                    friendly_m = {n: knobs["lmbda"] * friendly_m[n] + (1 - knobs["lmbda"]) * g[n] for n in g}
                final = _grads(net, _shift(params, _sam_eps(d, rho)), x, y)
            elif variant == "samon":
                final = _grads(net, _shift(params, _sam_eps(g, rho, knobs["selected"])), x, y)
            else:
                g_s = _grads(net, _shift(params, _sam_eps(g, rho)), x, y)
                final = g_s
                if variant == "looksam":
                    c = _dot(g, g_s) / _norm(g) ** 2
                    g_v = {n: g_s[n].double() - c * g[n].double() for n in g}
        sam_steps.append(bool(sam))
        for n, p in zip(names, leaves):
            p.grad = final[n].to(p.dtype).clone()
        opt.step()
    return {n: p.detach() for n, p in zip(names, leaves)}, sam_steps


def per_example_mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y, reduction="none")
