"""Symmetric label noise with an exact, reproducible noise rate."""

from __future__ import annotations

import torch
from torch import Tensor


def _check(num_examples: int, rate: float, seed: int) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be an int >= 0, got {num_examples!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must be a float in [0, 1), got {rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _choose(num_examples: int, rate: float, generator: torch.Generator) -> Tensor:
    # A permutation prefix: exactly round(rate * n) distinct positions, whatever the seed.
    count = round(rate * num_examples)
    return torch.randperm(num_examples, generator=generator)[:count]


def noisy_indices(num_examples: int, rate: float, seed: int) -> Tensor:
    """The positions that ``symmetric_label_noise`` corrupts for the same ``rate`` and ``seed``.

    Args:
        num_examples: Number of labels ``n``.
        rate: Noise rate in ``[0, 1)``.
        seed: Seed of the ``torch.Generator``.

    Returns:
        ``round(rate * n)`` distinct positions (int64, in the order drawn, not sorted).

    Example:

        >>> noisy_indices(10, 0.3, seed=0).numel()
        3
    """
    _check(num_examples, rate, seed)
    return _choose(num_examples, rate, torch.Generator().manual_seed(seed))


def symmetric_label_noise(targets: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """Corrupt a fraction ``rate`` of the labels, each to a different class drawn uniformly.

    Convention: exactly ``round(rate * n)`` examples (Python's ``round``, half to even) are chosen without
    replacement, and each gets a label drawn uniformly from the *other* ``num_classes - 1`` classes. Every chosen
    label therefore changes, and the realised noise rate (the fraction of labels that differ from the originals)
    equals ``rate`` up to that rounding. (Some papers draw the new label from all ``num_classes`` classes, which
    realises only ``rate * (num_classes - 1) / num_classes``.) The draw uses its own ``torch.Generator`` seeded with
    ``seed``: the result depends on ``seed`` only, never on the global RNG, and leaves the global RNG untouched.

    Args:
        targets: Integer labels in ``[0, num_classes)``, shape ``(n,)``; not modified.
        rate: Noise rate in ``[0, 1)``.
        num_classes: Number of classes, at least 2.
        seed: Seed of the noise: the same seed gives the same noisy labels.

    Returns:
        A new tensor with the dtype and device of ``targets``. The changed positions are
        ``noisy_indices(n, rate, seed)``.

    Raises:
        ValueError: for a rate outside ``[0, 1)``, fewer than 2 classes, labels out of range or not 1-D.

    Example:

        >>> clean = torch.arange(10) % 10
        >>> noisy = symmetric_label_noise(clean, 0.4, num_classes=10, seed=0)
        >>> int((noisy != clean).sum())
        4
    """
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be a 1-D integer tensor, got shape {tuple(targets.shape)} of {targets.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an int >= 2 (a label needs another class to flip to), got {num_classes!r}"
        )
    _check(targets.shape[0], rate, seed)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got values in [{int(targets.min())}, {int(targets.max())}]"
        )

    generator = torch.Generator().manual_seed(seed)
    index = _choose(targets.shape[0], rate, generator)
    # Adding an offset in [1, num_classes) modulo num_classes is a uniform draw among the other classes.
    offset = torch.randint(1, num_classes, (index.numel(),), generator=generator)
    noisy = targets.detach().cpu().clone()
    # In int64, so that a uint8 label plus its offset cannot wrap around.
    noisy[index] = ((noisy[index].long() + offset) % num_classes).to(noisy.dtype)
    return noisy.to(targets.device)
