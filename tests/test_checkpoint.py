"""Checkpoint / resume with SAM, on CPU, deterministic.

Equality: a resumed run executes exactly the same float32 operations, in the same order, on the same CPU and in
one process as the uninterrupted run, so the parameters must be bit-identical and we use ``torch.equal``. Anything
the checkpoint failed to carry (momentum buffers, the scheduler, the SAM/plain decision of ``interval``, the
unperturbed weights) changes them by about lr·grad (>1e-3 here), far from rounding noise. Comparisons with the
independent hand-written reference (``helpers.ref_train``, float64 ε, functional_call) use ``atol=1e-6``: same math,
different rounding.

Resumes are taken from a checkpoint at an epoch boundary (4 batches per epoch, checkpoint at step 4): Lightning
restarts a non-stateful DataLoader from its first batch when resuming mid-epoch, so a mid-epoch resume is not exact
even under automatic optimization.
"""

from __future__ import annotations

import torch
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

from helpers import (
    TinyModule,
    assert_params_equal,
    batches_of,
    make_loader,
    make_trainer,
    params_of,
    ref_train,
)
from lightning_sam import SAM, SAMModule, SAMOptimizer

LR, MOMENTUM, RHO, INTERVAL = 0.1, 0.9, 0.05, 2
N_EXAMPLES, BATCH = 16, 4  # 4 batches per epoch
N_STEPS, HALF = 8, 4


def _step_scheduler(opt):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5), "interval": "step"}


def _epoch_scheduler(opt):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "interval": "epoch"}


def _step_lrs(n: int) -> list[float]:
    return [LR * 0.5 ** (k // 3) for k in range(n)]  # StepLR(step_size=3, gamma=0.5), stepped after every step


class SAMTiny(SAMModule, TinyModule):
    """An existing module with SAMModule in front: SAM settings through the constructor."""


def _build(variant: str, scheduler=_step_scheduler):
    """(module, callbacks) for one of the three entry points."""
    if variant == "callback":
        return TinyModule(lr=LR, momentum=MOMENTUM, scheduler=scheduler), [SAM(rho=RHO, interval=INTERVAL)]
    if variant == "module":
        return SAMTiny(rho=RHO, interval=INTERVAL, lr=LR, momentum=MOMENTUM, scheduler=scheduler), []
    if variant == "samoptimizer":

        def factory(params):
            return SAMOptimizer(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)

        return TinyModule(scheduler=scheduler, optimizer_factory=factory), [SAM(interval=INTERVAL)]
    if variant == "automatic":
        return TinyModule(lr=LR, momentum=MOMENTUM, scheduler=scheduler), []
    raise ValueError(variant)


class WeightsAfterStep(Callback):
    """The module's weights after each optimizer step, keyed by global_step: recorded independently of checkpoints."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = params_of(pl_module)


def _fit(variant, max_steps, tmp_path=None, ckpt_path=None, scheduler=_step_scheduler):
    model, callbacks = _build(variant, scheduler)
    recorder = WeightsAfterStep()
    callbacks = callbacks + [recorder]
    kwargs = {}
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1))
        kwargs["enable_checkpointing"] = True
    trainer = make_trainer(callbacks=callbacks, max_steps=max_steps, max_epochs=100, **kwargs)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH), ckpt_path=ckpt_path)
    return model, trainer, recorder


def _sam_callback(trainer) -> SAM:
    (sam,) = [cb for cb in trainer.callbacks if isinstance(cb, SAM)]
    return sam


@pytest.mark.parametrize("variant", ["callback", "module", "samoptimizer"])
def test_resume_matches_uninterrupted_run(tmp_path, variant):
    batches = batches_of(make_loader(N_EXAMPLES, BATCH))
    ref_net = TinyModule().net  # same seed-0 initial weights as every run

    # Run A: N steps uninterrupted.
    model_a, trainer_a, _ = _fit(variant, N_STEPS)
    assert trainer_a.global_step == N_STEPS
    # ... and it is SGD(momentum) + StepLR + SAM on every other step, by hand:
    ref_a = ref_train(ref_net, batches + batches, _step_lrs(N_STEPS), RHO, momentum=MOMENTUM, interval=INTERVAL)
    assert_params_equal(params_of(model_a.net), ref_a, exact=False)

    # Run B, first half: N/2 steps, checkpoints every 2 steps.
    model_b, trainer_b, recorder_b = _fit(variant, HALF, tmp_path=tmp_path)
    ckpt_file = tmp_path / f"step={HALF}.ckpt"
    assert ckpt_file.exists(), sorted(p.name for p in tmp_path.iterdir())
    ckpt = torch.load(ckpt_file, weights_only=False)
    assert ckpt["global_step"] == HALF

    # The base optimizer's momentum buffers are in the checkpoint, and are the hand-computed ones.
    ref_half, ref_bufs = ref_train(
        ref_net, batches, _step_lrs(HALF), RHO, momentum=MOMENTUM, interval=INTERVAL, return_buffers=True
    )
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == 4 and all("momentum_buffer" in s for s in state.values())
    names = [n for n, _ in model_b.named_parameters()]
    for index, name in enumerate(names):
        torch.testing.assert_close(
            state[index]["momentum_buffer"], ref_bufs[name.removeprefix("net.")], rtol=0, atol=1e-6
        )
    assert ckpt["lr_schedulers"][0]["last_epoch"] == HALF

    # SAM's counters: global steps 0..3 with interval 2 -> SAM at 0 and 2, plain at 1 and 3.
    sam_states = [v for k, v in ckpt["callbacks"].items() if "SAM" in str(k)]
    assert len(sam_states) == 1, list(ckpt["callbacks"])
    assert sam_states[0]["sam_steps"] == 2
    assert sam_states[0]["plain_steps"] == 2
    assert sam_states[0]["config"]["interval"] == INTERVAL

    # The saved weights are the unperturbed ones: those the module held after step 4 (recorded by another callback),
    # and the hand-computed w after 4 steps (w + ε would be ~rho away).
    saved = {k: v for k, v in ckpt["state_dict"].items()}
    assert_params_equal(saved, recorder_b.weights[HALF])
    assert_params_equal({k.removeprefix("net."): v for k, v in saved.items()}, ref_half, exact=False)

    # Run B, second half: a fresh module and a fresh Trainer resume to N steps.
    model_c, trainer_c, _ = _fit(variant, N_STEPS, ckpt_path=str(ckpt_file))
    assert trainer_c.global_step == N_STEPS
    assert_params_equal(params_of(model_c), params_of(model_a))
    counters = _sam_callback(trainer_c).counters
    assert (counters.sam_steps, counters.plain_steps) == (4, 4)


def test_resume_at_epoch_end_keeps_epoch_scheduler_step(tmp_path):
    """An epoch-interval scheduler survives a resume from a checkpoint taken at the last batch of an epoch.

    ``ModelCheckpoint(every_n_train_steps=4)`` saves in ``on_train_batch_end`` of the epoch's last batch. Automatic
    optimization has already stepped its epoch schedulers by then (right after the last training step), so the resumed
    run continues at the decayed LR and matches the uninterrupted one bit for bit (checked below as the control).
    """
    for variant in ["automatic", "callback"]:
        directory = tmp_path / variant
        model_a, _, _ = _fit(variant, N_STEPS, scheduler=_epoch_scheduler)
        _fit(variant, HALF, tmp_path=directory, scheduler=_epoch_scheduler)
        ckpt = torch.load(directory / f"step={HALF}.ckpt", weights_only=False)
        model_c, trainer_c, _ = _fit(
            variant, N_STEPS, ckpt_path=str(directory / f"step={HALF}.ckpt"), scheduler=_epoch_scheduler
        )
        # Two epochs done -> two epoch-scheduler steps, whether interrupted or not.
        assert trainer_c.optimizers[0].param_groups[0]["lr"] == LR * 0.5**2, variant
        assert_params_equal(params_of(model_c), params_of(model_a))
        # As in automatic optimization, the checkpoint of the epoch's last batch holds the stepped scheduler.
        assert ckpt["lr_schedulers"][0]["last_epoch"] == 1, variant


class CrashInSecondPass(TinyModule):
    """Raises inside the second (perturbed) pass of the step with global_step == ``crash_step``."""

    def __init__(self, crash_step: int, **kwargs):
        super().__init__(**kwargs)
        self.crash_step = crash_step
        self.calls_in_step = 0
        self.weights_at_crash = None

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.crash_step:
            self.calls_in_step += 1
            if self.calls_in_step == 2:
                self.weights_at_crash = params_of(self)
                raise RuntimeError("crash in the second SAM pass")
        return super().training_step(batch, batch_idx)


class WeightsBeforeStep(Callback):
    def __init__(self):
        self.weights = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = params_of(pl_module)


def test_no_stale_perturbation_after_crash_in_second_pass(tmp_path):
    """A crash at w + ε leaves w in the module and in the OnExceptionCheckpoint, never w + ε."""
    crash_step = 2  # a SAM step with interval 2
    model = CrashInSecondPass(crash_step, lr=LR, momentum=MOMENTUM, scheduler=_step_scheduler)
    before = WeightsBeforeStep()
    trainer = make_trainer(
        callbacks=[SAM(rho=RHO, interval=INTERVAL), before, OnExceptionCheckpoint(dirpath=tmp_path)],
        max_epochs=1,
        enable_checkpointing=True,
    )
    with pytest.raises(RuntimeError, match="crash in the second SAM pass"):
        trainer.fit(model, make_loader(N_EXAMPLES, BATCH))

    w = before.weights[crash_step]
    # The test is meaningful: the second pass really ran at perturbed weights.
    assert model.weights_at_crash is not None
    assert any(not torch.equal(model.weights_at_crash[n], w[n]) for n in w)
    # After the crash: w, bit for bit.
    assert_params_equal(params_of(model), w)
    ckpt = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    assert_params_equal(dict(ckpt["state_dict"]), w)


def test_module_is_usable_again_after_a_crash():
    """After an exception in fit, the module is given back (automatic optimization, its own training_step), so the
    same object can be fit again (for example to resume) with a fresh Trainer and SAM."""
    model = CrashInSecondPass(crash_step=1, lr=LR)
    trainer = make_trainer(callbacks=[SAM(rho=RHO)], max_epochs=1)
    with pytest.raises(RuntimeError, match="crash in the second SAM pass"):
        trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert "training_step" not in model.__dict__
    assert model.automatic_optimization is True

    model.crash_step = -1  # no more crashes
    trainer = make_trainer(callbacks=[SAM(rho=RHO)], max_epochs=1)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert trainer.global_step == N_EXAMPLES // BATCH


@pytest.mark.parametrize("first, second", [("automatic", "callback"), ("callback", "automatic")])
def test_switching_sam_on_or_off_at_a_resume_continues_the_step_count(tmp_path, first, second):
    """Warm up without SAM, then resume with SAM (or the reverse): the resumed run continues at global_step 4.

    The step count, max_steps, the interval decision and the schedulers must pick up where the checkpoint left off,
    whichever optimization mode wrote it: 4 more steps (global_step 4..7), and the weights of 4 SGD steps followed by
    4 SAM steps (SAM at global steps 4 and 6), by hand.
    """
    _fit(first, HALF, tmp_path=tmp_path)
    ckpt_file = tmp_path / f"step={HALF}.ckpt"
    model, _ = _build(second)
    steps = WeightsBeforeStep()
    callbacks = [steps] + ([SAM(rho=RHO, interval=INTERVAL)] if second == "callback" else [])
    trainer = make_trainer(callbacks=callbacks, max_steps=N_STEPS, max_epochs=100)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH), ckpt_path=str(ckpt_file))

    assert sorted(steps.weights) == list(range(HALF, N_STEPS))
    assert trainer.global_step == N_STEPS

    sam_phase = range(HALF) if first == "callback" else range(HALF, N_STEPS)
    batches = batches_of(make_loader(N_EXAMPLES, BATCH))
    expected = ref_train(
        TinyModule().net,
        batches + batches,
        _step_lrs(N_STEPS),
        RHO,
        momentum=MOMENTUM,
        sam_on=lambda k: k in sam_phase and k % INTERVAL == 0,
    )
    assert_params_equal({k.removeprefix("net."): v for k, v in params_of(model).items()}, expected, exact=False)
