"""Splitting a batch into m-sharpness chunks of ``m`` examples each."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.data import extract_batch_size
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor


def batch_size(batch: Any) -> int:
    return extract_batch_size(batch)


def split_batch(batch: Any, m: int) -> list[tuple[Any, int]]:
    """``batch`` cut along dim 0 into chunks of ``m`` examples (the last may be smaller), with their sizes.

    Every tensor of the collection (tensor, tuple, list, dict, dataclass) whose first dimension is the batch size is
    sliced; other leaves are passed to every chunk as they are.
    """
    size = batch_size(batch)
    if m >= size:
        return [(batch, size)]

    def take(start: int, stop: int) -> Any:
        return apply_to_collection(batch, Tensor, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == size else t)

    return [(take(start, min(start + m, size)), min(start + m, size) - start) for start in range(0, size, m)]
