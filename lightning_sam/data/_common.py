"""Helpers shared by the data modules: argument checks, the train/val split with label noise, loader settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sam.data.label_noise import symmetric_label_noise


def check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) in ``[minimum, maximum]``."""
    # bool is an int subclass: `batch_size=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_noise_rate(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in ``[0, 1)`` (a rate of 1 would leave no clean label)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def check_split_args(
    *,
    batch_size: Any,
    num_workers: Any,
    val_size: Any,
    train_size: int,
    label_noise: Any,
    noise_seed: Any,
    split_seed: Any,
) -> None:
    """The checks every data module makes of its loader, split and label-noise arguments."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    check_int("val_size", val_size, minimum=0, maximum=train_size - 1)
    check_noise_rate("label_noise", label_noise)
    check_int("noise_seed", noise_seed, minimum=0)
    check_int("split_seed", split_seed, minimum=0)


def loader_kwargs(num_workers: int) -> dict[str, Any]:
    # Persistent workers keep their startup cost (imports, dataset copy) out of every epoch.
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0}


@dataclass(frozen=True)
class NoisySplit:
    """The training/validation split of a labelled training set, with label noise on the training part.

    Attributes:
        train_indices: Positions (in the original training set) of the examples trained on, in split order.
        val_indices: Positions of the held-out validation examples (empty when ``val_size`` is 0).
        train_targets: Labels of the training part as trained on: noisy where ``noisy_mask`` is True.
        clean_train_targets: The original labels of the training part.
        noisy_mask: True where the training label was corrupted.
    """

    train_indices: Tensor
    val_indices: Tensor
    train_targets: Tensor
    clean_train_targets: Tensor
    noisy_mask: Tensor


def split_with_noise(
    targets: Tensor,
    *,
    val_size: int,
    split_seed: int,
    label_noise: float,
    noise_seed: int,
    num_classes: int,
    train_subset: Optional[int] = None,
) -> NoisySplit:
    """Split ``targets`` into training and validation parts and corrupt the training labels.

    The validation part is the last ``val_size`` positions of ``torch.randperm(n)`` drawn with ``split_seed``; the
    training part is the rest, in permutation order, cut to its first ``train_subset`` examples if given. Noise is
    applied last, to the examples actually trained on, so that the realised noise rate is exactly ``label_noise``;
    validation labels are never touched.

    Args:
        targets: All labels of the original training set, shape ``(n,)``.
        val_size: Number of held-out examples, ``0 <= val_size < n``.
        split_seed: Seed of the split permutation.
        label_noise: Symmetric noise rate in ``[0, 1)`` (see ``symmetric_label_noise``).
        noise_seed: Seed of the noise.
        num_classes: Number of classes.
        train_subset: Keep only this many training examples (``None``: all).

    Example:

        split = split_with_noise(labels, val_size=5000, split_seed=0, label_noise=0.2, noise_seed=0, num_classes=10)
        assert split.noisy_mask.float().mean() == 0.2
    """
    n = targets.shape[0]
    if val_size >= n:
        raise ValueError(f"val_size must be smaller than the training set ({n} examples), got {val_size}")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    train_indices, val_indices = permutation[: n - val_size], permutation[n - val_size :]
    if train_subset is not None:
        if train_subset > train_indices.numel():
            raise ValueError(
                f"train_subset must be at most the number of training examples ({n} - val_size {val_size} ="
                f" {train_indices.numel()}), got {train_subset}"
            )
        train_indices = train_indices[:train_subset]
    clean = targets[train_indices]
    noisy = symmetric_label_noise(clean, label_noise, num_classes, noise_seed)
    return NoisySplit(
        train_indices=train_indices,
        val_indices=val_indices,
        train_targets=noisy,
        clean_train_targets=clean,
        noisy_mask=noisy != clean,
    )
