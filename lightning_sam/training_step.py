"""How the SAM passes enter a Lightning fit: installed on the Trainer's strategy, never on the user's module.

Two ways, one per face:

- ``AutomaticSAMStep`` (the ``SAM`` callback): the module stays in automatic optimization. The strategy's
  ``training_step`` returns the SAM loss of ``SAMPasses``; Lightning's own loop then does precision, zero-grad,
  backward (DDP's all-reduce), accumulation, clipping, the ``optimizer_step`` hook, schedulers, checkpoints and
  SWA's skipped backward, exactly as without SAM.
- ``ManualSAMStep`` (``SAMModule``): the module is in manual optimization, as its users expect. Each step calls the
  module's ``optimizer_zero_grad`` and ``optimizer_step`` hooks with a closure, as Lightning's automatic loop does,
  and lets Lightning clip and step the schedulers at its usual points.

Both give the strategy back exactly as it was (``Patcher``); the objects they install hold no reference that a
copy or pickle of the module would drag along.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sam import _lightning
from lightning_sam.config import SAMConfig
from lightning_sam.distributed import gradient_sync
from lightning_sam.patching import Patcher
from lightning_sam.step import SAMPasses, loss_of, with_loss


class _InstalledStep:
    """Replaces ``trainer.strategy.training_step`` for the fit and calls the original for each pass."""

    def __init__(self, trainer: pl.Trainer, module: pl.LightningModule, passes: SAMPasses, config: SAMConfig):
        self.trainer, self.module, self.passes, self.config = trainer, module, passes, config
        self.patcher = Patcher()
        self.strategy_step = trainer.strategy.training_step
        self._window_open = False

    def install(self) -> None:
        self.patcher.set(self.trainer.strategy, "training_step", self)

    def uninstall(self) -> None:
        self.patcher.restore()

    def step_output(self, args: tuple, kwargs: dict, last_of_window: bool) -> Any:
        window = (not self._window_open, last_of_window)
        self._window_open = not last_of_window
        return self.passes.run(self.trainer, self.module, self.strategy_step, args, kwargs, window)


class AutomaticSAMStep(_InstalledStep):
    """The SAM step of the ``SAM`` callback, for a module in automatic optimization."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trainer = self.trainer
        if _lightning.skip_backward(trainer):
            # SWA's BatchNorm epoch: a forward at w to collect statistics, nothing to climb for.
            return self.strategy_step(*args, **kwargs)
        return self.step_output(args, kwargs, last_of_window=not _lightning.should_accumulate(trainer))


class ManualSAMStep(_InstalledStep):
    """The SAM step of ``SAMModule``: manual optimization, with Lightning's optimizer hooks, clipping and schedulers."""

    def install(self) -> None:
        trainer, module = self.trainer, self.module
        self.patcher.set(module, "automatic_optimization", False)
        # Lightning's precision step (skip, clipping) and scheduler stepping treat manual optimization differently;
        # SAMModule wants them as in automatic.
        _lightning.step_and_schedule_as_in_automatic(trainer, self.patcher)
        self._quiet = _lightning.quiet_manual_checkpoint_warning()
        super().install()

    def uninstall(self) -> None:
        super().uninstall()
        self._quiet()
        _lightning.carry_manual_step_count(self.trainer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trainer, module = self.trainer, self.module
        # SWA's BatchNorm epoch: forwards at w only, no zero-grad and no backward, as automatic optimization does.
        skip = _lightning.skip_backward(trainer)
        batch_idx = _lightning.batch_idx(trainer)
        accumulate = trainer.accumulate_grad_batches
        take_step = not _lightning.should_accumulate(trainer)
        first_of_window = batch_idx % accumulate == 0
        outputs: list[Any] = []

        def closure() -> Optional[Any]:
            with _lightning.in_training_step(module):
                output = self.strategy_step(*args, **kwargs) if skip else self.step_output(args, kwargs, take_step)
                outputs.append(output)
                loss = loss_of(output)
                if first_of_window and not skip:
                    _lightning.zero_grad(trainer, batch_idx)
                if loss is None:
                    _lightning.check_world_size_for_skip(trainer)
                    return None
                if not skip:
                    with gradient_sync(trainer, take_step):
                        module.manual_backward(loss / accumulate if accumulate > 1 else loss)
                return loss.detach()

        if take_step:
            _lightning.optimizer_step(trainer, batch_idx, closure)
            if not outputs:
                raise MisconfigurationException(
                    "The closure hasn't been executed. HINT: did you call `optimizer_closure()` in your"
                    " `optimizer_step` hook? It could also happen because the `optimizer.step(optimizer_closure)`"
                    " call did not execute it internally."
                )
            _lightning.carry_manual_step_count(trainer)  # both counters agree: checkpoints resume with or without SAM
        else:
            closure()
        output = outputs[-1] if outputs else None
        loss = loss_of(output)
        if loss is not None and accumulate > 1:
            output = with_loss(output, loss.detach() / accumulate)  # as automatic optimization reports it
        return output
