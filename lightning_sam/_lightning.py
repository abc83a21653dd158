"""Every use of Lightning internals in one place, so a Lightning upgrade is checked here and nowhere else.

The ``SAM`` callback keeps automatic optimization and needs little from here. ``SAMModule`` runs in manual
optimization and calls the hooks that Lightning's automatic loop calls (``loops/optimization/automatic.py``:
``_on_before_zero_grad``, ``_optimizer_zero_grad``, ``_optimizer_step``), in the same order, with the same
arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer import call

from lightning_sam.patching import Patcher


def should_accumulate(trainer: pl.Trainer) -> bool:
    """True while the current batch is not the last micro-batch of an accumulation window."""
    return trainer.fit_loop._should_accumulate()


def skip_backward(trainer: pl.Trainer) -> bool:
    """True while Lightning skips backward and the optimizer step (SWA's BatchNorm epoch)."""
    return bool(trainer.fit_loop._skip_backward)


def batch_idx(trainer: pl.Trainer) -> int:
    return trainer.fit_loop.epoch_loop.batch_idx


def loss_scaler(trainer: pl.Trainer) -> Optional[torch.amp.GradScaler]:
    """The fp16 ``GradScaler`` of ``precision="16-mixed"``, else None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def scale_tensor(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The current loss scale as a device tensor (``get_scale()`` would sync with the host).

    The scaler creates its scale lazily, at its first ``scale()``: at the first step, SAM's local gradients come
    before Lightning's backward, so ask for it the public way first.
    """
    if getattr(scaler, "_scale", None) is None:
        scaler.scale(torch.ones((), device=device))
    return scaler._scale


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


def zero_grad(trainer: pl.Trainer, batch_idx: int) -> None:
    """``on_before_zero_grad`` (callbacks, then module) and the module's ``optimizer_zero_grad``, as automatic."""
    optimizer = trainer.optimizers[0]
    call._call_callback_hooks(trainer, "on_before_zero_grad", optimizer)
    call._call_lightning_module_hook(trainer, "on_before_zero_grad", optimizer)
    call._call_lightning_module_hook(trainer, "optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer)


def optimizer_step(trainer: pl.Trainer, batch_idx: int, closure: Callable[[], Any]) -> None:
    """The module's ``optimizer_step`` hook with the ``LightningOptimizer`` and a closure, as automatic.

    The step is counted as automatic optimization counts it (``_AutomaticOptimization._optimizer_step``): ready
    before the hook, completed after it, so that ``trainer.global_step`` inside an override (an LR warm-up, say)
    reads the same in both modes, and a step is counted even if the override does not call ``optimizer.step``. In
    manual optimization, ``LightningOptimizer.step`` would count it itself, in the middle of the hook.
    """
    optimizer = trainer.strategy._lightning_optimizers[0]
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    profiler = trainer.profiler
    patcher = Patcher()
    patcher.set(optimizer, "_on_before_step", lambda: profiler.start("optimizer_step"))
    patcher.set(optimizer, "_on_after_step", lambda: profiler.stop("optimizer_step"))
    progress.increment_ready()
    try:
        call._call_lightning_module_hook(
            trainer, "optimizer_step", trainer.current_epoch, batch_idx, optimizer, closure
        )
    finally:
        patcher.restore()
    progress.increment_completed()


def step_and_schedule_as_in_automatic(trainer: pl.Trainer, patcher: Patcher) -> None:
    """Let Lightning's precision step and LR scheduling treat a module in manual optimization as automatic.

    ``Precision.optimizer_step`` (with ``_after_closure``: clipping after ``on_before_optimizer_step``, on unscaled
    gradients; and under 16-mixed, skipping the step when the closure returned no loss) and
    ``_TrainingEpochLoop._update_learning_rates`` (after each optimizer step, after a mid-epoch validation for plateau
    schedulers, and at epoch end) treat manual optimization differently. The patches run Lightning's own code with
    the module reading as automatic for the duration of the call (the closure inside reads as manual again: see
    ``in_training_step``), so skipping, clipping, ``interval``, ``frequency``, ``monitor``, ``strict`` and the order
    against validation and checkpoints are Lightning's.
    """
    precision, epoch_loop = trainer.precision_plugin, trainer.fit_loop.epoch_loop
    for owner, name in ((precision, "optimizer_step"), (epoch_loop, "_update_learning_rates")):
        patcher.set(owner, name, _AsAutomatic(trainer, getattr(owner, name)))


@contextmanager
def in_training_step(module: pl.LightningModule) -> Iterator[None]:
    """The module's state while its ``training_step`` runs: manual optimization, and ``self.log`` filed under
    ``training_step`` (not under the ``optimizer_step`` hook that the closure runs in)."""
    patcher = Patcher()
    patcher.set(module, "_automatic_optimization", False)
    patcher.set(module, "_current_fx_name", "training_step")
    try:
        yield
    finally:
        patcher.restore()


class _AsAutomatic:
    def __init__(self, trainer: pl.Trainer, fn: Callable[..., Any]) -> None:
        self.trainer, self.fn = trainer, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        patcher = Patcher()
        patcher.set(self.trainer.lightning_module, "_automatic_optimization", True)
        try:
            return self.fn(*args, **kwargs)
        finally:
            patcher.restore()


def takes_dataloader_iter(module: pl.LightningModule) -> bool:
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    return is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True)


def check_manual_optimization_features(trainer: pl.Trainer, module_name: str) -> None:
    """Refuse the Trainer features that Lightning 2.6 does not run for a module in manual optimization.

    ``ModelCheckpoint.on_train_batch_end`` has a manual-optimization branch that ignores ``train_time_interval``,
    and ``GradientAccumulationScheduler`` raises for manual optimization: the SAM callback, which keeps automatic
    optimization, supports both.
    """
    from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    def refuse(feature: str, alternative: str) -> None:
        raise MisconfigurationException(
            f"`{module_name}` is a SAMModule, which trains in manual optimization, where Lightning does not run"
            f" {feature}. Use {alternative}, or train the module without the SAMModule base and with"
            " `Trainer(callbacks=[lightning_sam.SAM(...)])`, which keeps automatic optimization and supports it."
        )

    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler):
            refuse("`GradientAccumulationScheduler`", "a fixed `accumulate_grad_batches`")
        if isinstance(callback, ModelCheckpoint) and callback._train_time_interval is not None:
            refuse("`ModelCheckpoint(train_time_interval=...)`", "`every_n_train_steps` or `every_n_epochs`")
        if isinstance(callback, ModelCheckpoint) and callback._every_n_train_steps and callback.monitor is not None:
            refuse(
                "the deferral of a monitored `ModelCheckpoint(every_n_train_steps=...)` to the next validation (it"
                " would rank checkpoints by stale values)",
                "`every_n_epochs` with `monitor`, or `every_n_train_steps` without `monitor`",
            )


def check_tuner_callbacks(trainer: pl.Trainer) -> None:
    """Refuse the tuner callbacks: they run their search in ``on_fit_start`` before the SAM step is installed."""
    from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    for callback in trainer.callbacks:
        if isinstance(callback, (LearningRateFinder, BatchSizeFinder)):
            raise MisconfigurationException(
                f"`{type(callback).__name__}` (also what `Tuner.lr_find` / `Tuner.scale_batch_size` add) runs its"
                " search before SAM is installed: it would search with plain steps, not SAM's (which take two passes"
                " and hold more memory), and suggest a value for the wrong method. Run the search in its own fit, then"
                " train with SAM."
            )


def quiet_manual_checkpoint_warning() -> Callable[[], None]:
    """Silence, until the returned function is called, ``ModelCheckpoint``'s manual-optimization warning.

    It says that an ``every_n_train_steps`` checkpoint holds the state after the optimizer step, advising to save
    the state before it. SAMModule steps inside ``training_step``, so the checkpoint holds what automatic
    optimization would save: the warning does not apply.
    """
    import warnings

    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    entry = warnings.filters[0]

    def remove() -> None:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
            warnings._filters_mutated()

    return remove
