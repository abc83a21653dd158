"""The Hessian of a loss through Hessian-vector products: top eigenvalues, trace and spectral density.

Pure ``torch``. The loss is ``L(w) = (1/B) Σ_b loss_fn(model, batch_b)`` over the ``B`` batches given (each batch
weighs the same), differentiated with respect to the parameters with ``requires_grad``. A Hessian-vector product
(HVP) is a double backward: the gradient of each batch is taken once with ``create_graph=True`` and kept, and each
product is ``autograd.grad(g, w, grad_outputs=v)`` on that graph, so a product costs one backward of the backward
and no new forward. The graph is built with exact equivalents of layers that are costly to differentiate twice
(``_lean_graph``: eval-mode BatchNorm folded into the layer before it, ...; a third less per product on a small CNN).
Vectors are flat (all parameters concatenated), so the Lanczos recurrences are a few BLAS calls whatever the number
of parameter tensors.

Every function leaves the model exactly as it found it (``preserved_state``) and draws its random probes from its
own ``torch.Generator`` seeded by ``seed``: the global RNG is neither read nor advanced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, NamedTuple, Optional

import torch
from torch import Tensor, nn

from lightning_sam.diagnostics import _lean_graph
from lightning_sam.diagnostics._common import (
    LossFn,
    check_int,
    check_loss_fn,
    check_positive,
    materialize_batches,
    num_elements,
    scalar_loss,
    trainable_params,
)
from lightning_sam.diagnostics._state import preserved_state


class HessianOperator:
    """``v ↦ H v`` for the mean loss over ``batches``, on flat vectors.

    Build it inside ``preserved_state`` (the public functions do): it keeps one differentiable gradient per batch
    (``cache_graph=True``, memory: one autograd graph per batch) or recomputes it at every product
    (``cache_graph=False``, one more forward and backward per product).

    Args:
        model: The model; ``params`` are its parameters to differentiate.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batches: A list of batches.
        params: The parameters (with ``requires_grad``), in the order of the flat vectors.
        cache_graph: Keep each batch's gradient graph between products.
        lean_graph: Build the graph with exact equivalents of layers that are costly to differentiate twice
            (``_lean_graph.lean_graph``: eval-mode BatchNorm folded into the Conv or Linear layer before it, the
            data's convolution without the data's gradient, adaptive average pooling as plain pooling): the same
            products to rounding, less work.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: list[Any],
        params: list[Tensor],
        cache_graph: bool = True,
        lean_graph: bool = True,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.params = params
        self.cache_graph = cache_graph
        self.lean_graph = lean_graph
        self.sizes = [p.numel() for p in params]
        self.numel = sum(self.sizes)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.losses: list[float] = []
        self._grads: Optional[list[list[Tensor]]] = None
        if cache_graph:
            with self._forwards():
                self._grads = [self._grad(batch) for batch in batches]
        else:  # still check every loss before the first product
            for batch in batches:
                with torch.no_grad():
                    self.losses.append(float(scalar_loss(loss_fn, model, batch)))

    def _forwards(self) -> ContextManager[None]:
        # Around the graphs' building and every product: a checkpointed block recomputes its forward during a
        # product, and must find the same layers.
        return _lean_graph.lean_graph(self.model) if self.lean_graph else nullcontext()

    def _grad(self, batch: Any) -> list[Tensor]:
        # Called inside `_forwards()`: once per batch at construction, or at every product without a cached graph.
        with torch.enable_grad():
            loss = scalar_loss(self.loss_fn, self.model, batch)
            if self.cache_graph:
                self.losses.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]

    def _views(self, flat: Tensor) -> list[Tensor]:
        lead = flat.shape[:-1]
        return [t.view(*lead, *p.shape) for t, p in zip(flat.split(self.sizes, dim=-1), self.params)]

    def _product(self, grads: list[Tensor], vs: list[Tensor], batched: bool) -> Optional[list[Optional[Tensor]]]:
        pairs = [(g, v) for g, v in zip(grads, vs) if g.requires_grad]
        if not pairs:  # the loss is linear in the parameters: H = 0
            return None
        return list(
            torch.autograd.grad(
                [g for g, _ in pairs],
                self.params,
                grad_outputs=[v for _, v in pairs],
                retain_graph=self.cache_graph,
                allow_unused=True,
                is_grads_batched=batched,
            )
        )

    def _flat(self, hv: Optional[list[Optional[Tensor]]], lead: tuple[int, ...]) -> Tensor:
        if hv is None:
            return torch.zeros(*lead, self.numel, dtype=self.dtype, device=self.device)
        parts = [
            h.reshape(*lead, -1) if h is not None else torch.zeros(*lead, n, dtype=self.dtype, device=self.device)
            for h, n in zip(hv, self.sizes)
        ]
        return torch.cat(parts, dim=-1)

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` for a flat ``v`` of shape ``(n,)``, or ``H V`` row by row for ``V`` of shape ``(b, n)``."""
        batched = v.dim() == 2
        vs = self._views(v.to(self.dtype))
        total: Optional[Tensor] = None
        with torch.enable_grad(), self._forwards():
            for index, batch in enumerate(self.batches):
                grads = self._grads[index] if self._grads is not None else self._grad(batch)
                flat = self._flat(self._product(grads, vs, batched), tuple(v.shape[:-1]))
                total = flat if total is None else total.add_(flat)
        assert total is not None
        return total.div_(len(self.batches))


def _rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Drawn on the CPU from a CPU generator: the same probes on every device for a given seed.
    return (torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1).to(device)


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    return torch.Generator().manual_seed(seed)


class _Lanczos(NamedTuple):
    alphas: Tensor  # float64 (j,)
    betas: Tensor  # float64 (j - 1,)


def _tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


_DGKS = 1 / math.sqrt(2)


def _lanczos(
    op: HessianOperator, v0: Tensor, max_iter: int, k: Optional[int] = None, tol: Optional[float] = None
) -> _Lanczos:
    """Lanczos with full reorthogonalization from ``v0``; stops early once the top ``k`` Ritz values converged.

    A Ritz value θ_i is converged when its residual ‖H y_i − θ_i y_i‖ = β_j |s_{j,i}| is at most
    ``tol`` · max(|θ_i|, 1e-12 · ‖T‖). It also stops when the Krylov space is exhausted (β ≈ 0).
    """
    n = op.numel
    steps = min(max_iter, n)
    basis = torch.empty(steps, n, dtype=op.dtype, device=op.device)
    basis[0] = v0 / torch.linalg.vector_norm(v0)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        q = basis[j]
        w = op(q)
        alpha = torch.dot(w, q)
        w.sub_(q, alpha=float(alpha))
        if j > 0:
            w.sub_(basis[j - 1], alpha=betas[-1])
        # Full reorthogonalization keeps the Ritz values free of ghost copies. A second pass only where the first
        # removed much of w (Daniel-Gragg-Kaufman-Stewart, η = 1/√2): "twice is enough", and once mostly suffices.
        done = basis[: j + 1]
        before = float(torch.linalg.vector_norm(w))
        w.sub_(done.T @ (done @ w))
        beta = float(torch.linalg.vector_norm(w))
        if beta < _DGKS * before:
            w.sub_(done.T @ (done @ w))
            beta = float(torch.linalg.vector_norm(w))
        alphas.append(float(alpha))
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        exhausted = beta <= 1e-10 * max(scale, 1e-30)
        if k is not None and tol is not None and j + 1 >= k:
            theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
            residual = beta * s[-1, -k:].abs()
            if bool((residual <= tol * torch.clamp(theta[-k:].abs(), min=1e-12 * max(scale, 1e-30))).all()):
                break
        if exhausted or j + 1 == steps:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    return _Lanczos(torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64))


def _check_common(model: nn.Module, loss_fn: Any, batches: Any) -> tuple[list[Tensor], list[Any]]:
    params = trainable_params(model)
    check_loss_fn(loss_fn)
    return params, materialize_batches(batches)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    k: int = 1,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    eval_mode: bool = True,
    cache_graph: bool = True,
) -> Tensor:
    """The ``k`` largest eigenvalues of the Hessian of the mean loss over ``batches``, largest first.

    Args:
        model: Any ``nn.Module``; only parameters with ``requires_grad`` count.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: An iterable of batches (read once); the loss is their mean, each batch weighing the same.
        k: How many eigenvalues, at most the number of parameters.
        method: ``"lanczos"`` (default: Lanczos with full reorthogonalization, the top ``k`` *algebraic*
            eigenvalues; memory ``max_iter`` flat vectors) or ``"power"`` (power iteration with deflation, as
            PyHessian does: each eigenvalue in turn, the one of largest *magnitude* orthogonal to those found; it
            stops when the estimate changes by less than ``tol`` relative).
        max_iter: Lanczos steps, or power iterations per eigenvalue.
        tol: Lanczos: relative residual of the top ``k`` Ritz pairs; power: relative change between iterations.
        seed: Seed of the Rademacher start vector(s) (a private ``torch.Generator``).
        eval_mode: Evaluate with the model in eval mode (BatchNorm on its running statistics, no dropout);
            ``False``: train mode (batch statistics; the running statistics are restored afterwards).
        cache_graph: Keep each batch's gradient graph between products (faster; one graph per batch in memory).

    Returns:
        A float tensor of shape ``(k,)`` on the CPU (in the parameters' dtype), sorted in decreasing order.

    Raises:
        ValueError: no parameter with ``requires_grad``; ``k`` larger than the number of parameters or than
            ``max_iter`` (Lanczos); an empty ``batches``; a loss that is not a scalar.

    Example:

        top = hessian_eigenvalues(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [batch], k=3)
    """
    params, batch_list = _check_common(model, loss_fn, batches)
    n = num_elements(params)
    check_int("k", k)
    if k > n:
        raise ValueError(f"`k`={k} is larger than the number of parameters with requires_grad ({n}): ask for k <= {n}.")
    check_int("max_iter", max_iter)
    check_positive("tol", tol, allow_zero=True)
    if method not in ("lanczos", "power"):
        raise ValueError(f'`method` must be "lanczos" or "power", got {method!r}.')
    if method == "lanczos" and k > max_iter:
        raise ValueError(f"`k`={k} is larger than `max_iter`={max_iter}: Lanczos needs at least k steps.")
    generator = _generator(seed)
    with preserved_state(model, eval_mode=eval_mode):
        op = HessianOperator(model, loss_fn, batch_list, params, cache_graph)
        if method == "lanczos":
            v0 = _rademacher((n,), generator, op.dtype, op.device)
            result = _lanczos(op, v0, max_iter, k=k, tol=tol)
            theta = torch.linalg.eigvalsh(_tridiagonal(result.alphas.tolist(), result.betas.tolist()))
            top = theta.flip(0)[:k]
            if top.numel() < k:  # Krylov space exhausted before k: the remaining eigenvalues are not reachable
                raise RuntimeError(
                    f"Lanczos found only {top.numel()} eigenvalues (the start vector spans an invariant subspace of"
                    f" that size); use method='power' or another seed for k={k}."
                )
            return top.to(params[0].dtype)
        return _power_iteration(op, k, max_iter, tol, generator).to(params[0].dtype)


def _power_iteration(op: HessianOperator, k: int, max_iter: int, tol: float, generator: torch.Generator) -> Tensor:
    found: list[Tensor] = []
    values: list[float] = []
    for _ in range(k):
        v = _rademacher((op.numel,), generator, op.dtype, op.device)
        estimate: Optional[float] = None
        for _ in range(max_iter):
            if found:
                basis = torch.stack(found)
                v = v - basis.T @ (basis @ v)
            v = v / torch.linalg.vector_norm(v)
            hv = op(v)
            new = float(torch.dot(hv, v))
            norm = torch.linalg.vector_norm(hv)
            if float(norm) == 0.0:
                estimate = 0.0
                break
            v = hv / norm
            if estimate is not None and abs(new - estimate) / (abs(estimate) + 1e-6) < tol:
                estimate = new
                break
            estimate = new
        values.append(float(estimate))
        found.append(v)
    return torch.tensor(sorted(values, reverse=True), dtype=torch.float64)


class HutchinsonTrace(NamedTuple):
    """Hutchinson's estimate of tr(H): the mean of vᵀHv over Rademacher probes v."""

    trace: float
    std_error: float
    """Standard error of the mean over the probes (sample std / √num_probes); 0 for one probe."""
    num_probes: int
    samples: Tensor
    """Each probe's vᵀHv (float64, CPU)."""


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    num_probes: int = 100,
    tol: Optional[float] = 1e-2,
    min_probes: int = 10,
    block_size: int = 1,
    seed: int = 0,
    eval_mode: bool = True,
    cache_graph: bool = True,
) -> HutchinsonTrace:
    """Hutchinson's estimator of the trace of the Hessian: E[vᵀHv] over Rademacher vectors v.

    Args:
        model: Any ``nn.Module``; only parameters with ``requires_grad`` count.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: An iterable of batches (read once); the loss is their mean.
        num_probes: At most this many probes.
        tol: Stop once the standard error is at most ``tol`` · |estimate| (after ``min_probes``); ``None``: run all
            ``num_probes``.
        min_probes: Probes before the stopping rule applies.
        block_size: Probes per Hessian product (batched with ``is_grads_batched``: fewer, larger kernels).
        seed: Seed of the probes (a private ``torch.Generator``).
        eval_mode: As in ``hessian_eigenvalues``.
        cache_graph: As in ``hessian_eigenvalues``.

    Returns:
        A ``HutchinsonTrace`` (``trace``, ``std_error``, ``num_probes``, ``samples``).

    Example:

        estimate = hessian_trace(model, loss_fn, batches, num_probes=200)
        print(f"{estimate.trace:.1f} ± {estimate.std_error:.1f}")
    """
    params, batch_list = _check_common(model, loss_fn, batches)
    check_int("num_probes", num_probes)
    check_int("min_probes", min_probes)
    check_int("block_size", block_size)
    if tol is not None:
        check_positive("tol", tol)
    generator = _generator(seed)
    samples: list[Tensor] = []
    count = 0
    with preserved_state(model, eval_mode=eval_mode):
        op = HessianOperator(model, loss_fn, batch_list, params, cache_graph)
        while count < num_probes:
            b = min(block_size, num_probes - count)
            v = _rademacher((b, op.numel), generator, op.dtype, op.device)
            hv = op(v) if b > 1 else op(v[0]).unsqueeze(0)
            samples.append((v * hv).sum(dim=1).double().cpu())
            count += b
            if tol is not None and count >= max(min_probes, 2):
                values = torch.cat(samples)
                mean, se = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
                if se <= tol * abs(mean):
                    break
    values = torch.cat(samples)
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else 0.0
    return HutchinsonTrace(float(values.mean()), se, int(values.numel()), values)


@dataclass
class HessianSpectrum:
    """The spectral density of the Hessian by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    For each probe v (a random unit vector), ``num_steps`` Lanczos steps give a tridiagonal T = S Θ Sᵀ; the
    density is approximated by Σ_i S[0, i]² δ(t − θ_i), averaged over the probes, and smoothed by a Gaussian.

    Attributes:
        nodes: ``(num_probes, num_steps)`` Ritz values θ (float64).
        weights: ``(num_probes, num_steps)`` quadrature weights S[0, i]², each row summing to 1.
    """

    nodes: Tensor
    weights: Tensor

    @property
    def top_eigenvalue(self) -> float:
        """The largest Ritz value: an estimate (from below) of the top eigenvalue."""
        return float(self.nodes.max())

    def density(
        self, grid: Optional[Tensor] = None, sigma: Optional[float] = None, num_points: int = 1000
    ) -> tuple[Tensor, Tensor]:
        """``(grid, density)``: the smoothed density on ``grid`` (default: ``num_points`` points over the range
        of the nodes, padded by 5%), with a Gaussian of width ``sigma`` (default: 1% of that range)."""
        low, high = float(self.nodes.min()), float(self.nodes.max())
        span = max(high - low, 1e-12)
        if grid is None:
            grid = torch.linspace(low - 0.05 * span, high + 0.05 * span, num_points, dtype=torch.float64)
        grid = grid.to(torch.float64)
        sigma = 0.01 * span if sigma is None else sigma
        diff = grid[:, None, None] - self.nodes[None]  # (points, probes, steps)
        kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return grid, (kernel * self.weights[None]).sum(dim=2).mean(dim=1)


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    num_steps: int = 30,
    num_probes: int = 1,
    seed: int = 0,
    eval_mode: bool = True,
    cache_graph: bool = True,
) -> HessianSpectrum:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (the paper's "spectrum" figure).

    Args:
        model: Any ``nn.Module``; only parameters with ``requires_grad`` count.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: An iterable of batches (read once); the loss is their mean.
        num_steps: Lanczos steps per probe (nodes of the quadrature), at most the number of parameters.
        num_probes: Random start vectors (Rademacher, normalized) averaged.
        seed: Seed of the probes (a private ``torch.Generator``).
        eval_mode: As in ``hessian_eigenvalues``.
        cache_graph: As in ``hessian_eigenvalues``.

    Returns:
        A ``HessianSpectrum``; ``.density()`` gives the smoothed curve, ``plotting.plot_spectrum`` draws it.

    Example:

        spectrum = hessian_spectrum(model, loss_fn, batches, num_steps=40)
        grid, density = spectrum.density()
    """
    params, batch_list = _check_common(model, loss_fn, batches)
    check_int("num_steps", num_steps)
    check_int("num_probes", num_probes)
    generator = _generator(seed)
    nodes, weights = [], []
    with preserved_state(model, eval_mode=eval_mode):
        op = HessianOperator(model, loss_fn, batch_list, params, cache_graph)
        steps = min(num_steps, op.numel)
        for _ in range(num_probes):
            v0 = _rademacher((op.numel,), generator, op.dtype, op.device)
            result = _lanczos(op, v0, steps)
            theta, s = torch.linalg.eigh(_tridiagonal(result.alphas.tolist(), result.betas.tolist()))
            pad = steps - theta.numel()  # an exhausted Krylov space: pad with zero-weight nodes
            nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
            weights.append(torch.cat([s[0] ** 2, torch.zeros(pad, dtype=torch.float64)]))
    return HessianSpectrum(torch.stack(nodes), torch.stack(weights))
