"""Argument checks and small helpers shared by the diagnostics (pure torch)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar tensor``: the loss of ``model`` on one batch."""


def trainable_params(model: nn.Module) -> list[Tensor]:
    """The parameters with ``requires_grad`` (each once), or a ``ValueError`` saying there are none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True: there is nothing to differentiate."
            " Unfreeze the parameters to measure (`p.requires_grad_(True)`)."
        )
    return params


def materialize_batches(batches: Any) -> list[Any]:
    """The batches as a list (a single tensor or a DataLoader is read once), or a ``ValueError`` if empty."""
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"`batches` must be an iterable of batches (a list, a DataLoader, ...), got {type(batches).__name__}."
            " For one batch, pass `[batch]`."
        )
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: give at least one batch to measure the loss on.")
    return batches


def check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a callable `loss_fn(model, batch) -> scalar tensor`, got {loss_fn!r}.")


def scalar_loss(loss_fn: LossFn, model: nn.Module, batch: Any) -> Tensor:
    """``loss_fn(model, batch)``, checked to be a scalar floating-point tensor."""
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor):
        raise TypeError(f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}.")
    if loss.numel() != 1 or loss.dim() > 1:
        raise ValueError(
            f"`loss_fn` must return a scalar loss, got a tensor of shape {tuple(loss.shape)}. Reduce it (e.g. use"
            " `reduction='mean'`)."
        )
    if not loss.is_floating_point():
        raise TypeError(f"`loss_fn` must return a floating-point loss, got dtype {loss.dtype}.")
    return loss.reshape(())


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")


def num_elements(params: Sequence[Tensor]) -> int:
    return sum(p.numel() for p in params)


def batch_size_of(batch: Any) -> int:
    """Size of dim 0 of the first tensor found in ``batch`` (tensor, tuple, list or dict)."""
    for leaf in _leaves(batch):
        if leaf.dim() > 0:
            return leaf.shape[0]
    raise ValueError(f"cannot tell the batch size: no tensor with a batch dimension in a {type(batch).__name__}.")


def _leaves(batch: Any) -> Iterable[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _leaves(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _leaves(value)


def slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """Examples ``start:stop`` of ``batch``: every tensor whose dim 0 is ``size`` is sliced, other leaves kept."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return type(batch)((k, slice_batch(v, start, stop, size)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, start, stop, size) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, start, stop, size) for v in batch)
    return batch


def split_batch(batch: Any, m: int) -> list[tuple[Any, int]]:
    """``batch`` cut along dim 0 into chunks of ``m`` examples (the last may be smaller), with their sizes."""
    size = batch_size_of(batch)
    return [(slice_batch(batch, s, min(s + m, size), size), min(s + m, size) - s) for s in range(0, size, m)]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
