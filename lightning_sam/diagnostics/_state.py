"""One context manager that puts a model back exactly as it was: mode, weights, buffers, ``.grad`` and RNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_sam.rng import get_rng_state, set_rng_state


@contextmanager
def preserved_state(*models: nn.Module, eval_mode: Optional[bool] = None) -> Iterator[None]:
    """Snapshot ``models`` on entry and restore them bit for bit on exit (also after an exception).

    Restored: each submodule's ``training`` flag, every parameter's and buffer's values (copied back in place, so
    the tensors keep their identity and whoever holds them, an optimizer for instance, sees no change), every
    parameter's ``.grad`` (the same tensor object with its old values, or ``None``), the CPU torch RNG state and,
    where CUDA is initialized, the CUDA RNG state of every device.

    Args:
        models: The modules to preserve (several, for a path between two models).
        eval_mode: ``True``: put every model in eval mode inside the block (BatchNorm uses its running statistics,
            dropout is off); ``False``: train mode; ``None``: leave the mode as it is.

    Example:

        with preserved_state(model, eval_mode=True):
            model.fc.weight.add_(1.0)  # undone on exit
    """
    modes = [(module, module.training) for model in models for module in model.modules()]
    params = list(dict.fromkeys(p for model in models for p in model.parameters()))
    buffers = list(dict.fromkeys(b for model in models for b in model.buffers()))
    with torch.no_grad():
        param_copies = [p.detach().clone() for p in params]
        buffer_copies = [b.detach().clone() for b in buffers]
        grads: list[tuple[Optional[Tensor], Optional[Tensor]]] = [
            (p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params
        ]
    rng = get_rng_state()
    try:
        if eval_mode is not None:
            for model in models:
                model.train(not eval_mode)
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, param_copies):
                p.copy_(saved)
            for b, saved in zip(buffers, buffer_copies):
                b.copy_(saved)
            for p, (grad, saved) in zip(params, grads):
                if grad is not None:
                    grad.copy_(saved)
                p.grad = grad
        for module, training in modes:
            module.training = training
        set_rng_state(rng)
