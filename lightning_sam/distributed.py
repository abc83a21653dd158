"""Where SAM meets distributed training: which strategies are sound, and when gradients are all-reduced.

SAM as in the paper computes ε on each device from its own gradients (m-sharpness): the first backward must not be
all-reduced, the second must. One gradient all-reduce per SAM step, as for SGD.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lightning_sam.batchnorm import has_sync_batchnorm

_UNSUPPORTED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def check_strategy(trainer: pl.Trainer) -> None:
    """Refuse the strategies under which the SAM step would be silently wrong."""
    strategy = trainer.strategy
    if isinstance(strategy, _UNSUPPORTED):
        raise ValueError(
            f"lightning_sam does not support `{type(strategy).__name__}`: gradients are sharded there (or owned by the"
            " engine), so the first backward cannot be kept local and ε cannot be computed from `p.grad`."
            ' Use `strategy="ddp"` (or a single device).'
        )
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", {}) or {}
    if ddp_kwargs.get("static_graph"):
        raise ValueError(
            "`DDPStrategy(static_graph=True)` is not supported with SAM: with a static graph Lightning delays the"
            " all-reduce of the first manual backward of the run, which for SAM is the local one, so ranks would"
            " diverge. Use `DDPStrategy(static_graph=False)` (the default)."
        )


def warn_sync_batchnorm(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    if getattr(trainer.strategy, "_layer_sync", None) is not None or has_sync_batchnorm(module):
        rank_zero_warn(
            "SyncBatchNorm communicates in its forward and backward even where gradient sync is off, so both SAM"
            " passes exchange batch statistics across devices: four collectives per layer per SAM step instead of"
            " two for an SGD step. Plain BatchNorm keeps ε per device, as in the paper."
        )


def gradient_sync(trainer: pl.Trainer, enabled: bool) -> ContextManager[None]:
    """A context in which ``manual_backward`` all-reduces gradients only if ``enabled``.

    Lightning arms the DDP reducer on each ``manual_backward`` only when ``require_backward_grad_sync`` is set, so
    blocking sync around the backward is enough (a plain PyTorch DDP loop needs its forward in ``no_sync`` too).
    """
    strategy = trainer.strategy
    if enabled or not isinstance(strategy, ParallelStrategy):
        return nullcontext()
    return strategy.block_backward_sync()
