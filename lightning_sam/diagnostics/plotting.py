"""Plots of the diagnostics (matplotlib, the optional ``plot`` extra, imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from torch import Tensor

from lightning_sam.diagnostics.hessian import HessianSpectrum
from lightning_sam.diagnostics.landscape import Landscape, LinearPath


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or an ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover
        raise ImportError("plotting needs matplotlib: `pip install 'lightning-sam[plot]'`") from err
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(ax: Any, figsize: tuple[float, float] = (5.2, 3.6)) -> Any:
    if ax is not None:
        return ax
    _, ax = pyplot().subplots(figsize=figsize)
    return ax


def plot_spectrum(
    spectra: Mapping[str, HessianSpectrum],
    ax: Any = None,
    sigma: Optional[float] = None,
    log: bool = True,
    num_points: int = 2000,
    floor: float = 1e-8,
) -> Any:
    """The eigenvalue densities of several ``HessianSpectrum``s on one axes (e.g. "SGD, epoch 1", "SAM, end").

    All are smoothed on one common grid (over all nodes) with one ``sigma`` (default 1% of the range), so their
    widths compare; a log density axis (``log``, cut at ``floor``) shows the outliers, whose quadrature weights are
    of the order of 1/(number of parameters), as in Ghorbani et al. (2019) and Foret et al. (2020).

    Returns:
        The matplotlib axes.
    """
    import torch

    ax = _axes(ax)
    low = min(float(s.nodes.min()) for s in spectra.values())
    high = max(float(s.nodes.max()) for s in spectra.values())
    span = max(high - low, 1e-12)
    grid = torch.linspace(low - 0.05 * span, high + 0.05 * span, num_points, dtype=torch.float64)
    sigma = 0.01 * span if sigma is None else sigma
    for label, spectrum in spectra.items():
        _, density = spectrum.density(grid=grid, sigma=sigma)
        ax.plot(grid.numpy(), density.clamp_min(floor / 10).numpy() if log else density.numpy(), label=label)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


Curve = Union[Landscape, tuple[Tensor, Tensor]]


def plot_landscape_1d(landscapes: Mapping[str, Curve], ax: Any = None) -> Any:
    """1-D landscapes (``Landscape`` with ``dims=1``, or ``(alphas, losses)``) of several models on one axes."""
    ax = _axes(ax)
    for label, curve in landscapes.items():
        alphas, losses = (curve.alphas, curve.losses) if isinstance(curve, Landscape) else curve
        ax.plot(alphas.numpy(), losses.numpy(), marker=".", label=label)
    ax.set_xlabel("α (filter-normalized random direction)")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def plot_landscape_2d(landscape: Landscape, ax: Any = None, levels: int = 20, log: bool = False) -> Any:
    """A contour plot of a 2-D ``Landscape`` (``dims=2``), with the weights w marked at the origin."""
    if landscape.betas is None:
        raise ValueError("plot_landscape_2d needs a 2-D landscape (loss_landscape(..., dims=2)).")
    ax = _axes(ax, (4.6, 4.0))
    values = landscape.losses.log() if log else landscape.losses
    contour = ax.contour(landscape.alphas.numpy(), landscape.betas.numpy(), values.T.numpy(), levels=levels)
    ax.clabel(contour, inline=True, fontsize=7)
    ax.plot([0], [0], "k+")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    return ax


def plot_linear_path(
    path: Union[LinearPath, Tensor], losses: Optional[Tensor] = None, labels: Sequence[str] = ("a", "b"), ax: Any = None
) -> Any:
    """The loss along the straight line between two models (a ``LinearPath``, or ``ts`` and ``losses``)."""
    ts, values = (path.ts, path.losses) if isinstance(path, LinearPath) else (path, losses)
    ax = _axes(ax)
    ax.plot(ts.numpy(), values.numpy(), marker=".")
    for t, label in zip((0.0, 1.0), labels):
        ax.axvline(t, color="gray", lw=0.8, ls="--")
        ax.annotate(label, (t, float(values.max())), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel(f"t: (1 − t)·{labels[0]} + t·{labels[1]}")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return ax


def plot_eigenvalue_history(histories: Mapping[str, Sequence[tuple[float, float]]], ax: Any = None) -> Any:
    """Top eigenvalue against epoch (or step) for several runs: ``{"SGD": [(epoch, value), ...], ...}``."""
    ax = _axes(ax)
    for label, points in histories.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax
