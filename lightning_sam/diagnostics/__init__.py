"""Flatness diagnostics: Hessian eigenvalues, trace and spectrum, m-sharpness and loss landscapes.

Pure ``torch`` on any ``nn.Module``: each function takes the model, a ``loss_fn(model, batch) -> scalar`` and an
iterable of batches, and leaves the model exactly as it was (mode, weights, buffers, ``.grad``, torch RNG).
``FlatnessMonitor`` (in ``lightning_sam.diagnostics.callback``) logs them during a Lightning fit and the
``lightning-sam-flatness`` command measures checkpoints.

Example:

    import torch.nn.functional as F
    from lightning_sam.diagnostics import hessian_eigenvalues, hessian_trace, sharpness

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    top = hessian_eigenvalues(model, loss_fn, batches, k=3)
    trace = hessian_trace(model, loss_fn, batches).trace
    s = sharpness(model, loss_fn, batches, rho=0.05, m=16)
"""

from lightning_sam.diagnostics._state import preserved_state
from lightning_sam.diagnostics.hessian import (
    HessianOperator,
    HessianSpectrum,
    HutchinsonTrace,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
)
from lightning_sam.diagnostics.landscape import (
    Landscape,
    LinearPath,
    filter_normalized_direction,
    linear_path,
    loss_landscape,
)
from lightning_sam.diagnostics.sharpness import sharpness

__all__ = [
    "HessianOperator",
    "HessianSpectrum",
    "HutchinsonTrace",
    "Landscape",
    "LinearPath",
    "filter_normalized_direction",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "linear_path",
    "loss_landscape",
    "preserved_state",
    "sharpness",
]
