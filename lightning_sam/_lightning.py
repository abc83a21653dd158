"""Every use of Lightning internals in one place, so a Lightning upgrade is checked here and nowhere else.

Manual optimization leaves gradient accumulation, clipping and LR scheduling to the user; the SAM step does them
as automatic optimization would, and needs a few facts that Lightning keeps in its loops.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch


def should_accumulate(trainer: pl.Trainer) -> bool:
    """True while the current batch is not the last micro-batch of an accumulation window."""
    return trainer.fit_loop._should_accumulate()


def epoch_batches_done(trainer: pl.Trainer) -> bool:
    """True when the epoch ran all its batches (not cut short by ``max_steps``): when epoch schedulers step."""
    return trainer.fit_loop.epoch_loop._num_ready_batches_reached()


def batch_idx(trainer: pl.Trainer) -> int:
    return trainer.fit_loop.epoch_loop.batch_idx


def loss_scaler(trainer: pl.Trainer) -> Optional[torch.amp.GradScaler]:
    """The fp16 ``GradScaler`` of ``precision="16-mixed"``, else None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def scale_tensor(scaler: torch.amp.GradScaler) -> Optional[torch.Tensor]:
    """The current loss scale as a device tensor: ``get_scale()`` would sync with the host."""
    return getattr(scaler, "_scale", None)


def carry_manual_step_count(trainer: pl.Trainer) -> None:
    """Copy the manual-optimization step count into the automatic one.

    ``trainer.global_step`` reads the automatic or the manual counter according to the module's flag. The SAM step
    runs in manual mode and gives the module back in automatic mode at teardown, so the step count is carried over:
    ``trainer.global_step`` after ``fit`` is the number of optimizer steps taken.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    steps = epoch_loop.manual_optimization.optim_step_progress.total
    auto = epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    auto.ready, auto.completed = steps.ready, steps.completed


def adopt_automatic_step_count(trainer: pl.Trainer) -> None:
    """After resuming from a checkpoint written without SAM, continue its step count in the manual counter."""
    epoch_loop = trainer.fit_loop.epoch_loop
    steps = epoch_loop.manual_optimization.optim_step_progress.total
    auto = epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    if auto.completed > steps.completed:
        steps.ready, steps.completed = auto.ready, auto.completed


def count_optimizers(optim_conf: Any) -> int:
    """How many optimizers a ``configure_optimizers`` result holds, parsed as Lightning parses it."""
    from lightning.pytorch.core.optimizer import _configure_optimizers

    return len(_configure_optimizers(optim_conf)[0])


def check_world_size_for_skip(trainer: pl.Trainer) -> None:
    if trainer.world_size > 1:
        raise RuntimeError(
            "Skipping the `training_step` by returning None in distributed training is not supported (the ranks would"
            " disagree on the collectives). Rewrite the training step so that it always returns a loss."
        )


def lr_scheduler_step(trainer: pl.Trainer, module: pl.LightningModule, config: Any, monitor_val: Any) -> None:
    from lightning.pytorch.trainer import call

    call._call_lightning_module_hook(trainer, "lr_scheduler_step", config.scheduler, monitor_val)
