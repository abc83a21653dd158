"""LR schedulers and ``trainer.global_step`` under the SAM callback behave as under automatic optimization.

The reference is the same module trained WITHOUT SAM (Lightning's automatic optimization steps its schedulers
itself). At every optimizer step (``on_before_optimizer_step``) we record the LR the optimizer is about to use and
``trainer.global_step``; the two runs must agree exactly, and the LR must actually have changed, so a scheduler that
was never stepped (or stepped at the wrong time / rate) fails.
"""

from __future__ import annotations

import pytest
import torch

from helpers import StepRecorder, TinyModule, make_loader, make_trainer
from lightning_sam import SAM, SAMModule

LR = 0.1


def _step_lr_freq2(opt):
    return {
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        "interval": "step",
        "frequency": 2,
    }


def _step_lr_epoch(opt):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "interval": "epoch"}


def _plateau_epoch(opt):
    # A constant monitored value never improves: with patience=0 the LR halves at every scheduler step after the first.
    return {
        "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=0, factor=0.5),
        "monitor": "const",
    }


def _plateau_step(opt):
    return {
        "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=0, factor=0.5),
        "monitor": "const",
        "interval": "step",
    }


SCHEDULERS = {
    "step-freq2": _step_lr_freq2,
    "epoch": _step_lr_epoch,
    "plateau-epoch": _plateau_epoch,
    "plateau-step": _plateau_step,
}


class ConstMetricModule(TinyModule):
    """Logs a constant ``const`` from ``where`` (the metric a ReduceLROnPlateau monitors)."""

    def __init__(self, where: str = "training_step", **kwargs):
        super().__init__(**kwargs)
        self.where = where

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.where == "training_step":
            self.log("const", 1.0, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self):
        if self.where == "on_train_epoch_end":
            self.log("const", 1.0)


class ConstInValidation(ConstMetricModule):
    def validation_step(self, batch, batch_idx):
        self.log("const", 1.0)


class SAMConstMetricModule(SAMModule, ConstMetricModule):
    pass


class SAMConstInValidation(SAMModule, ConstInValidation):
    pass


def _run(sam, scheduler, accumulate: int = 1, n: int = 16, epochs: int = 3, where: str = "training_step"):
    """``sam``: False (no SAM), True (the callback) or "mixin" (SAMModule, in manual optimization)."""
    if sam == "mixin":
        cls = SAMConstInValidation if where == "validation_step" else SAMConstMetricModule
        model = cls(where=where, lr=LR, scheduler=scheduler, rho=0.05)
    else:
        cls = ConstInValidation if where == "validation_step" else ConstMetricModule
        model = cls(where=where, lr=LR, scheduler=scheduler)
    recorder = StepRecorder()
    callbacks = [recorder] + ([SAM(rho=0.05)] if sam is True else [])
    trainer = make_trainer(callbacks=callbacks, max_epochs=epochs, accumulate_grad_batches=accumulate)
    val = make_loader(8, seed=7) if where == "validation_step" else None
    trainer.fit(model, make_loader(n), val_dataloaders=val)
    return recorder, trainer


FACES = [pytest.param(True, id="callback"), pytest.param("mixin", id="mixin")]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_lr_sequence_matches_automatic_optimization(kind, accumulate, face):
    """Every optimizer step sees the same LR with SAM as without it (step/frequency, epoch, plateau; accumulation)."""
    auto, auto_trainer = _run(False, SCHEDULERS[kind], accumulate)
    sam, sam_trainer = _run(face, SCHEDULERS[kind], accumulate)

    steps = 3 * 4 // accumulate  # 3 epochs of 4 batches
    assert len(auto.step_lrs) == steps
    assert sam.step_lrs == auto.step_lrs
    # The scheduler did something (else the comparison is vacuous): the LR dropped below its initial value.
    assert auto.step_lrs[0] == LR
    assert min(sam.step_lrs) < LR
    assert sam.step_global == auto.step_global == list(range(steps))
    assert sam_trainer.global_step == auto_trainer.global_step == steps


def test_step_frequency_counts_batches_not_optimizer_steps_under_accumulation():
    """Lightning's rule: a "step" scheduler's ``frequency`` divides batch_idx + 1, checked at stepping batches only.

    8 batches, accumulate 2: optimizer steps at batch_idx + 1 = 2, 4, 6, 8. Frequency 4 steps the scheduler at 4 and 8
    (LR halves before the 3rd optimizer step); counting optimizer steps instead would step it only after the 4th.
    Frequency 3 steps it at 6 only.
    """
    for frequency, expected in [(3, [LR, LR, LR, LR / 2]), (4, [LR, LR, LR / 2, LR / 2])]:

        def sched(opt, frequency=frequency):
            return {
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
                "interval": "step",
                "frequency": frequency,
            }

        auto, _ = _run(False, sched, accumulate=2, n=32, epochs=1)
        sam, _ = _run(True, sched, accumulate=2, n=32, epochs=1)
        assert auto.step_lrs == expected
        assert sam.step_lrs == expected


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("n, accumulate, steps_per_epoch", [(32, 2, 4), (28, 2, 4), (32, 1, 8), (24, 4, 2)])
def test_global_step_is_one_per_optimizer_step(n, accumulate, steps_per_epoch, face):
    """8 batches with accumulate 2 -> 4 optimizer steps; 7 batches -> 4 (the last, short window steps too)."""
    sched = _step_lr_freq2
    auto, auto_trainer = _run(False, sched, accumulate, n=n, epochs=2)
    sam, sam_trainer = _run(face, sched, accumulate, n=n, epochs=2)
    expected = 2 * steps_per_epoch
    assert len(sam.step_global) == expected  # on_before_optimizer_step fired once per optimizer step
    assert sam.step_global == list(range(expected)) == auto.step_global
    assert sam_trainer.global_step == auto_trainer.global_step == expected
    assert sam.step_lrs == auto.step_lrs


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("where", ["training_step", "validation_step", "on_train_epoch_end"])
def test_plateau_monitor_logged_where_automatic_optimization_accepts_it(where, face):
    """An epoch ReduceLROnPlateau may monitor a metric logged in training_step, validation_step or the module's
    ``on_train_epoch_end``: automatic optimization steps plateau schedulers after all ``on_train_epoch_end`` hooks,
    so all three work there, and must work with SAM too, with the same LR sequence."""
    auto, _ = _run(False, _plateau_epoch, where=where)
    assert min(auto.step_lrs) < LR  # the reference really reduced the LR
    sam, _ = _run(face, _plateau_epoch, where=where)
    assert sam.step_lrs == auto.step_lrs
