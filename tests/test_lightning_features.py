"""The one-line promise: every Lightning feature an unchanged module uses works under SAM as under automatic
optimization, or is refused at setup with a message that says why.

Each case runs the same module with SAM (the callback, and the SAMModule mixin) and without SAM, and compares what
Lightning did: hooks called, LR sequence, checkpoints written, and the final weights against the hand reference of
``helpers.ref_train`` (which never imports lightning_sam).
"""

from __future__ import annotations

import copy
import pickle
import warnings
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from helpers import (
    D_IN,
    StepRecorder,
    TinyModule,
    assert_params_equal,
    batches_of,
    make_loader,
    make_net,
    make_trainer,
    params_of,
    ref_train,
)
from lightning_sam import SAM, SAMModule

LR, RHO, N, BATCH = 0.1, 0.05, 16, 4
FACES = ["callback", "mixin"]


def _fit(face: str, model_cls, mixin_cls, callbacks=(), sam_kwargs=None, model_kwargs=None, **trainer_kwargs):
    """Fit ``model_cls`` without SAM (face "none"), with the SAM callback, or as its SAMModule version."""
    sam_kwargs = {"rho": RHO, **(sam_kwargs or {})}
    model_kwargs = {"lr": LR, **(model_kwargs or {})}
    callbacks = list(callbacks)
    if face == "none":
        model = model_cls(**model_kwargs)
    elif face == "callback":
        model = model_cls(**model_kwargs)
        callbacks.append(SAM(**sam_kwargs))
    else:
        model = mixin_cls(**sam_kwargs, **model_kwargs)
    val = trainer_kwargs.pop("val", None)
    data = trainer_kwargs.pop("data", None) or make_loader(N, BATCH)
    trainer = make_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, data, val_dataloaders=val)
    return model, trainer


def _reference(steps: int, lrs=None, accumulate: int = 1, epochs: int = 1):
    batches = batches_of(make_loader(N, BATCH)) * epochs
    lrs = lrs if lrs is not None else [LR] * (len(batches) // accumulate + 1)
    return ref_train(make_net(0), batches[: steps * accumulate], lrs, RHO, accumulate=accumulate)


def _weights(model) -> dict:
    return {k.removeprefix("net."): v for k, v in params_of(model).items()}


# ----------------------------------------------------------------------------- 1. training_step signatures
class NoBatchIdx(TinyModule):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)


class SAMNoBatchIdx(SAMModule, NoBatchIdx):
    pass


class DataloaderIter(TinyModule):
    def training_step(self, dataloader_iter):
        x, y = next(dataloader_iter)
        return F.mse_loss(self(x), y)


class SAMDataloaderIter(SAMModule, DataloaderIter):
    pass


@pytest.mark.parametrize("face", FACES)
def test_training_step_without_batch_idx(face):
    model, trainer = _fit(face, NoBatchIdx, SAMNoBatchIdx, max_epochs=1)
    assert trainer.global_step == N // BATCH
    assert_params_equal(_weights(model), _reference(N // BATCH), exact=False)


@pytest.mark.parametrize("face", FACES)
def test_training_step_with_dataloader_iter_is_refused_before_training(face):
    with pytest.raises(MisconfigurationException, match="dataloader_iter.*second call would pull another batch"):
        model, _ = _fit(face, DataloaderIter, SAMDataloaderIter, max_epochs=1)
    assert_params_equal(_weights(DataloaderIter()), params_of(make_net(0)))


# ----------------------------------------------------------------------------- 2. step-interval ReduceLROnPlateau
class ValPlateau(TinyModule):
    """A step-interval ReduceLROnPlateau on a validation metric that never improves."""

    def __init__(self, strict: bool = True, **kwargs):
        def scheduler(opt):
            return {
                "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
                "interval": "step",
                "monitor": "val_const",
                "strict": strict,
            }

        super().__init__(scheduler=scheduler, **kwargs)

    def validation_step(self, batch, batch_idx):
        self.log("val_const", 1.0)


class SAMValPlateau(SAMModule, ValPlateau):
    pass


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("strict, val_every", [(True, 1), (False, 2)])
def test_step_plateau_scheduler_steps_after_the_validation_at_that_batch(face, strict, val_every):
    def run(face):
        recorder = StepRecorder()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fit(
                face,
                ValPlateau,
                SAMValPlateau,
                callbacks=[recorder],
                model_kwargs={"strict": strict},
                max_epochs=2,
                val_check_interval=val_every,
                val=make_loader(8, seed=7),
            )
        return recorder.step_lrs

    expected = run("none")
    assert min(expected) < LR  # the plateau scheduler really cut the LR
    assert run(face) == expected


# ----------------------------------------------------------------------------- 3. SWA with BatchNorm
class BNModule(TinyModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


class SAMBNModule(SAMModule, BNModule):
    pass


class BatchNormEpochProbe(Callback):
    """In SWA's BatchNorm epoch: the gradients when it starts, and the weights and gradients at its optimizer step."""

    def __init__(self, swa):
        self.swa, self.grads_at_start, self.at_step = swa, None, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.fit_loop._skip_backward:
            self.grads_at_start = [p.grad.clone() for p in pl_module.parameters()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.fit_loop._skip_backward:
            average = [p.detach().clone() for p in self.swa._average_model.parameters()]
            self.at_step = ([p.detach().clone() for p in pl_module.parameters()], average)
            self.grads_at_step = [p.grad.clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("face", FACES)
def test_swa_batchnorm_epoch_runs_as_in_automatic_optimization(face):
    def run(face):
        recorder = StepRecorder()
        swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
        probe = BatchNormEpochProbe(swa)
        model, trainer = _fit(face, BNModule, SAMBNModule, callbacks=[swa, recorder, probe], max_epochs=3)
        return model, trainer, probe, recorder

    auto_model, auto_trainer, auto_probe, auto_rec = run("none")
    model, trainer, probe, recorder = run(face)
    # SWA adds a BatchNorm epoch in which Lightning skips zero-grad and backward; automatic optimization still calls
    # `optimizer_step` once at its end (with the gradients left in `.grad`). The SAM run does exactly that.
    assert recorder.step_global == auto_rec.step_global
    assert len(recorder.step_global) == 3 * N // BATCH + 1
    assert trainer.global_step == auto_trainer.global_step
    # In that epoch: no SAM pass and no backward (the gradients are untouched), and the weights are SWA's average.
    weights, average = probe.at_step
    for w, a in zip(weights, average):
        assert torch.equal(w, a)
    for before, at_step in zip(probe.grads_at_start, probe.grads_at_step):
        assert torch.equal(before, at_step)
    assert int(model.net[1].num_batches_tracked) == int(auto_model.net[1].num_batches_tracked)


# ----------------------------------------------------------------------------- 4. hooks the module overrides
class Warmup(TinyModule):
    """Lightning's LR warm-up recipe in ``optimizer_step``, and an ``optimizer_zero_grad`` override."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.zero_grad_calls = 0
        self.optimizer_step_calls = 0

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        self.optimizer_step_calls += 1
        optimizer.step(closure=optimizer_closure)
        scale = min(1.0, float(self.trainer.global_step + 1) / 3.0)
        for group in optimizer.param_groups:
            group["lr"] = scale * LR

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.zero_grad_calls += 1
        optimizer.zero_grad(set_to_none=True)


class SAMWarmup(SAMModule, Warmup):
    pass


class ZeroGradCounter(Callback):
    def __init__(self):
        self.calls = 0

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self.calls += 1
        # Every hook after training_step sees the weights at w, never w + ε.
        assert not any(torch.isnan(p).any() for p in pl_module.parameters())


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_optimizer_hooks_the_module_overrides_run(face, accumulate):
    def run(face):
        recorder, counter = StepRecorder(), ZeroGradCounter()
        model, _ = _fit(
            face, Warmup, SAMWarmup, callbacks=[recorder, counter], max_epochs=2, accumulate_grad_batches=accumulate
        )
        return model, recorder, counter

    auto, auto_rec, auto_counter = run("none")
    model, recorder, counter = run(face)
    steps = 2 * N // BATCH // accumulate
    assert auto.optimizer_step_calls == model.optimizer_step_calls == steps
    assert auto.zero_grad_calls == model.zero_grad_calls == auto_counter.calls == counter.calls == steps
    assert recorder.step_lrs == auto_rec.step_lrs
    assert len(set(recorder.step_lrs)) > 1  # the warm-up changed the LR
    lrs = recorder.step_lrs + [LR]
    expected = _reference(steps, lrs=lrs, accumulate=accumulate, epochs=2)
    assert_params_equal(_weights(model), expected, exact=False)


# ----------------------------------------------------------------------------- 5. Trainer features
def test_checkpoint_train_time_interval_saves_as_without_sam(tmp_path):
    def run(face):
        ckpt = ModelCheckpoint(dirpath=tmp_path / face, train_time_interval=timedelta(microseconds=1), save_top_k=-1)
        _fit(face, TinyModule, None, callbacks=[ckpt], max_epochs=1, enable_checkpointing=True)
        return sorted(p.name for p in (tmp_path / face).iterdir())

    expected = run("none")
    assert len(expected) >= N // BATCH - 1
    assert run("callback") == expected


def test_gradient_accumulation_scheduler_works_with_the_callback():
    model, trainer = _fit(
        "callback", TinyModule, None, callbacks=[GradientAccumulationScheduler({0: 1, 1: 2})], max_epochs=2
    )
    assert trainer.global_step == N // BATCH + N // BATCH // 2
    # Epoch 0: one batch per step; epoch 1: two. The reference runs the same schedule.
    net = make_net(0)
    batches = batches_of(make_loader(N, BATCH))
    params = ref_train(net, batches, [LR] * 4, RHO)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(params[name])
    expected = ref_train(net, batches, [LR] * 2, RHO, accumulate=2)
    assert_params_equal(_weights(model), expected, exact=False)


@pytest.mark.parametrize(
    "callback, match",
    [
        (GradientAccumulationScheduler({0: 1, 1: 2}), "GradientAccumulationScheduler"),
        (ModelCheckpoint(train_time_interval=timedelta(seconds=1)), "train_time_interval"),
    ],
    ids=["accumulation-scheduler", "train-time-interval"],
)
def test_mixin_refuses_what_manual_optimization_cannot_run(callback, match):
    model = SAMTiny(rho=RHO, lr=LR)
    before = params_of(model)
    with pytest.raises(MisconfigurationException, match=f"manual optimization.*{match}.*lightning_sam.SAM"):
        make_trainer(callbacks=[callback], max_epochs=1, enable_checkpointing=True).fit(model, make_loader(N, BATCH))
    assert_params_equal(params_of(model), before)


class SAMTiny(SAMModule, TinyModule):
    pass


@pytest.mark.parametrize("face", FACES)
def test_no_misleading_manual_checkpoint_warning(face, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
        _fit(face, TinyModule, SAMTiny, callbacks=[ckpt], max_epochs=1, enable_checkpointing=True)
    assert not [w for w in caught if "manual optimization" in str(w.message)]
    assert len(list(tmp_path.iterdir())) == N // BATCH // 2
    # The filter is gone after the fit.
    assert not any("every_n_train_steps" in str(f[1]) for f in warnings.filters if f[1] is not None)


# ----------------------------------------------------------------------------- 6. per-group rho
class GroupRho(TinyModule):
    def __init__(self, group_rho=0.1, **kwargs):
        super().__init__(**kwargs)
        self.group_rho = group_rho

    def configure_optimizers(self):
        first, second = self.net[0], self.net[2]
        groups = [{"params": first.parameters()}, {"params": second.parameters(), "rho": self.group_rho}]
        return torch.optim.SGD(groups, lr=self.lr)


class SAMGroupRho(SAMModule, GroupRho):
    pass


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("rho", [float("nan"), -0.1, 0.0, float("inf")])
def test_bad_per_group_rho_is_refused_before_training(face, rho):
    with pytest.raises(ValueError, match=r"Param group 1 of the optimizer: `rho` must be a finite number > 0"):
        _fit(face, GroupRho, SAMGroupRho, model_kwargs={"group_rho": rho}, max_epochs=1)


# ----------------------------------------------------------------------------- 7. m chunks: logged loss, BatchNorm
class LogsLoss(TinyModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.outputs = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.outputs.append(float(outputs["loss"]))


class SAMLogsLoss(SAMModule, LogsLoss):
    pass


@pytest.mark.parametrize("face", FACES)
def test_with_m_chunks_train_loss_is_the_batch_loss_at_w(face):
    model, trainer = _fit(face, LogsLoss, SAMLogsLoss, sam_kwargs={"m": 1}, max_steps=1)
    x, y = batches_of(make_loader(N, BATCH))[0]
    expected = F.mse_loss(make_net(0)(x).squeeze(-1), y)
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert model.outputs[0] == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("face", FACES)
def test_with_m_chunks_each_chunk_updates_batchnorm_as_a_batch_of_m(face):
    model, _ = _fit(face, BNModule, SAMBNModule, sam_kwargs={"m": 2}, max_steps=1)
    x, _ = batches_of(make_loader(N, BATCH))[0]
    bn_in = BNModule().net[0](x).detach()  # the same initial weights: every construction draws the same numbers
    mean, var = torch.zeros(8), torch.ones(8)
    for chunk in (bn_in[:2], bn_in[2:]):
        mean = 0.9 * mean + 0.1 * chunk.mean(0)
        var = 0.9 * var + 0.1 * chunk.var(0, unbiased=True)
    torch.testing.assert_close(model.net[1].running_mean, mean)
    torch.testing.assert_close(model.net[1].running_var, var)
    assert int(model.net[1].num_batches_tracked) == 2


# ----------------------------------------------------------------------------- 8. hooks on the instance before fit
@pytest.mark.parametrize("face", FACES)
def test_instance_hooks_from_before_the_fit_are_kept(face):
    model = TinyModule(lr=LR) if face == "callback" else SAMTiny(rho=RHO, lr=LR)
    calls = []
    original = model.training_step

    def training_step(batch, batch_idx):
        calls.append(batch_idx)
        return original(batch, batch_idx)

    model.training_step = training_step
    make_trainer(callbacks=[SAM(rho=RHO)] if face == "callback" else [], max_steps=2).fit(model, make_loader(N, BATCH))
    assert model.__dict__["training_step"] is training_step
    assert calls == [0, 0, 1, 1]  # at w and at w + ε


@pytest.mark.parametrize("face", ["none", *FACES])
def test_torch_compile_keeps_its_compiled_training_step(face):
    model = TinyModule(lr=LR) if face != "mixin" else SAMTiny(rho=RHO, lr=LR)
    compiled = torch.compile(model, backend="eager")
    callbacks = [SAM(rho=RHO)] if face == "callback" else []
    make_trainer(callbacks=callbacks, max_steps=2).fit(compiled, make_loader(N, BATCH))
    assert "training_step" in model.__dict__  # Lightning's compiled training_step, still there after the fit
    if face != "none":
        assert_params_equal(_weights(model), _reference(2), exact=False)


# ----------------------------------------------------------------------------- 9. copies and pickles during fit
class CopyDuringFit(Callback):
    def __init__(self):
        self.sizes = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        clone = copy.deepcopy(pl_module)  # the usual EMA pattern
        assert clone._trainer is None
        assert all(not isinstance(v, pl.Trainer) for v in vars(clone).values())
        self.sizes.append(len(pickle.dumps(pl_module)))
        restored = pickle.loads(pickle.dumps(pl_module))
        assert restored._trainer is None
        assert type(restored.training_step).__name__ == "method"


@pytest.mark.parametrize("face", FACES)
def test_copying_or_pickling_the_module_during_fit_leaves_the_trainer_behind(face):
    auto, sam = CopyDuringFit(), CopyDuringFit()
    _fit("none", TinyModule, SAMTiny, callbacks=[auto], max_steps=2)
    _fit(face, TinyModule, SAMTiny, callbacks=[sam], max_steps=2)
    if face == "callback":
        assert sam.sizes == auto.sizes  # the pickled module is the same as without SAM
    assert max(sam.sizes) < 20_000


# ----------------------------------------------------------------------------- 10. outputs["loss"] under accumulation
@pytest.mark.parametrize("face", ["none", *FACES])
def test_outputs_loss_is_divided_by_accumulate_grad_batches(face):
    model, trainer = _fit(face, LogsLoss, SAMLogsLoss, max_steps=2, accumulate_grad_batches=2)
    batches = batches_of(make_loader(N, BATCH))
    net = make_net(0)
    # The first window's micro-batches are at the initial weights in every run: the loss at w, divided by 2.
    for i in range(2):
        x, y = batches[i]
        expected = float(F.mse_loss(net(x).squeeze(-1), y)) / 2
        assert model.outputs[i] == pytest.approx(expected, rel=1e-6)
