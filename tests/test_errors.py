"""Clear, early errors for what SAM cannot do, and edge cases of the step that must stay well-behaved."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from helpers import (
    StepRecorder,
    TinyModule,
    assert_params_equal,
    batches_of,
    make_loader,
    make_trainer,
    params_of,
    ref_loss_and_grads,
    ref_sam_step,
    ref_train,
)
from lightning_sam import SAM, SAMModule, SAMOptimizer
from lightning_sam.distributed import check_strategy

N_EXAMPLES, BATCH, LR = 16, 4, 0.1


class SAMTiny(SAMModule, TinyModule):
    pass


# ------------------------------------------------------------------------------------------- constructor validation
BAD_SETTINGS = [
    (dict(rho=0.0), "rho"),
    (dict(rho=-0.1), "rho"),
    (dict(rho=math.nan), "rho"),
    (dict(rho=math.inf), "rho"),
    (dict(epsilon=-1e-8), "epsilon"),
    (dict(interval=0), "interval"),
    (dict(interval=-2), "interval"),
    (dict(interval=1.5), "interval"),
    (dict(interval=2.0), "interval"),
    (dict(bn_policy="second"), "bn_policy"),
    (dict(m=0), "`m`"),
    (dict(m=2.5), "`m`"),
]
OPTIMIZER_SETTINGS = ("rho", "epsilon")  # SAMOptimizer has no interval / bn_policy / m


def _construct(entry: str, settings: dict):
    if entry == "SAM":
        return SAM(**settings)
    if entry == "SAMModule":
        return SAMTiny(**settings)
    return SAMOptimizer(nn.Linear(2, 1).parameters(), torch.optim.SGD, lr=0.1, **settings)


CASES = [
    pytest.param(entry, settings, name, id=f"{entry}-{k}={v!r}")
    for entry in ["SAM", "SAMModule", "SAMOptimizer"]
    for settings, name in BAD_SETTINGS
    for k, v in settings.items()
    if entry != "SAMOptimizer" or set(settings) <= set(OPTIMIZER_SETTINGS)
]


@pytest.mark.parametrize("entry, settings, name", CASES)
def test_bad_setting_is_rejected_at_construction(entry, settings, name):
    with pytest.raises(ValueError, match=name) as info:
        _construct(entry, settings)
    # The message names the offending value.
    assert f"got {next(iter(settings.values()))!r}" in str(info.value)


def test_bad_per_group_rho_in_samoptimizer_is_rejected():
    layer = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="rho"):
        SAMOptimizer([{"params": [layer.weight], "rho": 0.0}, {"params": [layer.bias]}], torch.optim.SGD, lr=0.1)


def test_good_settings_are_accepted():
    SAM(rho=0.5, interval=3, epsilon=0.0, bn_policy="both", m=2)
    SAMTiny(rho=0.5, interval=3, epsilon=0.0, bn_policy="both", m=2)
    SAMOptimizer(nn.Linear(2, 1).parameters(), torch.optim.SGD, rho=0.5, epsilon=0.0, lr=0.1)


# ------------------------------------------------------------------------------------------- fit-time configuration
class CallCounter(TinyModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return super().training_step(batch, batch_idx)


class TwoOptimizers(CallCounter):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=LR), torch.optim.SGD(self.net[2].parameters(), lr=LR)]


def test_two_optimizers_fail_at_fit_start():
    """SAM needs one optimizer; its own message comes before Lightning's advice to switch to manual optimization."""
    model = TwoOptimizers()
    with pytest.raises(MisconfigurationException, match="SAM needs exactly one optimizer.*returned 2"):
        make_trainer(callbacks=[SAM()]).fit(model, make_loader(N_EXAMPLES, BATCH))
    assert model.calls == 0
    assert "configure_optimizers" not in model.__dict__  # the check is gone with the failed fit


def test_gradient_clip_by_value_is_rejected():
    model = CallCounter()
    trainer = make_trainer(callbacks=[SAM()], gradient_clip_val=1.0, gradient_clip_algorithm="value")
    with pytest.raises(MisconfigurationException, match="direction"):
        trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert model.calls == 0


class ManualModule(CallCounter):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.calls += 1
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_module_is_rejected():
    model = ManualModule()
    with pytest.raises(MisconfigurationException, match="automatic_optimization = False"):
        make_trainer(callbacks=[SAM()]).fit(model, make_loader(N_EXAMPLES, BATCH))
    assert model.calls == 0


def test_two_sam_callbacks_are_rejected():
    """Two SAM callbacks of one class: Lightning refuses them already at Trainer construction (same state_key)."""
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `SAM`"):
        make_trainer(callbacks=[SAM(), SAM(rho=0.1)])


def test_two_sam_callbacks_of_different_classes_are_rejected_before_training():
    """A SAM subclass has its own state_key, so Lightning accepts both; SAM itself must refuse them at setup."""

    class MySAM(SAM):
        pass

    model = CallCounter()
    with pytest.raises(MisconfigurationException, match="More than one `SAM` callback"):
        make_trainer(callbacks=[SAM(), MySAM(rho=0.1)]).fit(model, make_loader(N_EXAMPLES, BATCH))
    assert model.calls == 0
    # Likewise when the second one is appended to the Trainer's callbacks after construction.
    model = CallCounter()
    trainer = make_trainer(callbacks=[SAM()])
    trainer.callbacks.append(SAM(rho=0.1))
    with pytest.raises(MisconfigurationException, match="More than one `SAM` callback"):
        trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert model.calls == 0


def test_samodule_and_callback_with_different_settings_conflict():
    model = SAMTiny(rho=0.1)
    with pytest.raises(MisconfigurationException, match=r"rho: module 0\.1 vs callback 0\.2"):
        make_trainer(callbacks=[SAM(rho=0.2)]).fit(model, make_loader(N_EXAMPLES, BATCH))


def _one_step_reference(rho: float):
    net = TinyModule().net
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    _, _, _, grads = ref_sam_step(net, params, batches_of(make_loader(N_EXAMPLES, BATCH))[0], rho)
    return {n: p - LR * grads[n] for n, p in params.items()}


@pytest.mark.parametrize(
    "module_kwargs, callback_kwargs, expected_rho",
    [({}, dict(rho=0.2), 0.2), (dict(rho=0.2), {}, 0.2), ({}, {}, 0.05)],
    ids=["default-module+callback-rho", "module-rho+default-callback", "both-default"],
)
def test_samodule_and_callback_settings_in_one_place(module_kwargs, callback_kwargs, expected_rho):
    """The settings of whichever side sets them are used: checked in the callback and in the weights after one step."""
    model = SAMTiny(lr=LR, **module_kwargs)
    sam = SAM(**callback_kwargs)
    trainer = make_trainer(callbacks=[sam], max_steps=1)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert [cb for cb in trainer.callbacks if isinstance(cb, SAM)] == [sam]
    assert sam.config.rho == expected_rho
    got = {k.removeprefix("net."): v for k, v in params_of(model).items()}
    assert_params_equal(got, _one_step_reference(expected_rho), exact=False)
    other = _one_step_reference(0.05 if expected_rho != 0.05 else 0.2)
    assert any((got[n] - other[n]).abs().max() > 1e-5 for n in got)  # the rho made a visible difference


# ------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy_name", ["fsdp", "deepspeed"])
def test_sharded_strategies_are_rejected(strategy_name):
    """A Trainer with FSDP cannot be built on CPU (Lightning requires a GPU) and DeepSpeed needs its package, so the
    check is called on a stand-in trainer holding a real strategy instance (DeepSpeed's made without __init__)."""
    if strategy_name == "fsdp":
        with pytest.raises(ValueError, match="GPU"):
            make_trainer(strategy=FSDPStrategy())  # the Trainer path is closed on CPU
        strategy = FSDPStrategy()
        expected = "FSDPStrategy"
    else:
        try:
            strategy = DeepSpeedStrategy()
        except MisconfigurationException:  # deepspeed is not installed
            strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
        expected = "DeepSpeedStrategy"
    with pytest.raises(ValueError, match=expected) as info:
        check_strategy(SimpleNamespace(strategy=strategy))
    assert 'strategy="ddp"' in str(info.value)


def test_ddp_static_graph_is_rejected_by_the_trainer():
    """A real one-process DDP (gloo) Trainer: the check fires in SAM.setup, before any training_step."""
    env = dict(os.environ)
    model = CallCounter()
    try:
        trainer = make_trainer(callbacks=[SAM()], strategy=DDPStrategy(static_graph=True))
        with pytest.raises(ValueError, match="static_graph"):
            trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)
    assert model.calls == 0
    # The default DDP (no static graph) passes the same check.
    check_strategy(SimpleNamespace(strategy=DDPStrategy()))


# ------------------------------------------------------------------------------------------- edge cases of the step
class ZeroLoss(TinyModule):
    def training_step(self, batch, batch_idx):
        loss = 0.0 * self(batch[0]).sum()
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("epsilon", [1e-12, 0.0])
def test_zero_gradient_gives_no_nan(epsilon):
    model = ZeroLoss(lr=LR, momentum=0.9)
    w0 = params_of(model)
    recorder = StepRecorder()
    trainer = make_trainer(callbacks=[SAM(epsilon=epsilon), recorder])
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert trainer.global_step == N_EXAMPLES // BATCH
    for value in params_of(model).values():
        assert torch.isfinite(value).all()
    assert_params_equal(params_of(model), w0)  # ε = 0 and a zero gradient: nothing moves
    for metrics in recorder.batch_end_metrics:
        assert metrics["sam/grad_norm"] == 0.0
        assert metrics["sam/sharpness"] == 0.0
        assert all(math.isfinite(v) for v in metrics.values())


class PartlyFrozen(TinyModule):
    """net.0 and net.2 train; ``frozen`` is used in forward but has requires_grad=False; ``unused`` gets no gradient."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(1)
        self.frozen = nn.Linear(1, 1)
        self.frozen.requires_grad_(False)
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.frozen(self.net(x)).squeeze(-1)

    def configure_optimizers(self):  # every parameter in the optimizer, with momentum and weight decay
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=0.1)


def test_frozen_and_gradless_parameters_are_untouched():
    model = PartlyFrozen(lr=LR)
    w0 = params_of(model)
    trainer = make_trainer(callbacks=[SAM(rho=0.2)], max_steps=1)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    w1 = params_of(model)
    for name in ["frozen.weight", "frozen.bias", "unused"]:
        assert torch.equal(w1[name], w0[name]), name  # bit for bit
    # The trainable ones moved, by the hand-computed SAM step whose ε spans only parameters with a gradient.
    net = PartlyFrozen(lr=LR)
    batch = batches_of(make_loader(N_EXAMPLES, BATCH))[0]
    params = params_of(net)
    _, _, _, grads = ref_sam_step(net, params, batch, 0.2)
    assert set(grads) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    for name, g in grads.items():
        expected = params[name] - LR * (g + 0.1 * params[name])
        torch.testing.assert_close(w1[name], expected, rtol=0, atol=1e-6)
        assert not torch.equal(w1[name], w0[name])


class SkipBatch(TinyModule):
    def __init__(self, skip: int, **kwargs):
        super().__init__(**kwargs)
        self.skip = skip

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == self.skip else loss


class WeightsAround(Callback):
    def __init__(self):
        self.before, self.after = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(params_of(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(params_of(pl_module))


def test_training_step_returning_none_skips_the_batch():
    """Returning None skips the batch as Lightning does: no update (momentum untouched), the step is still counted."""
    skip, rho, momentum = 1, 0.1, 0.9
    around = WeightsAround()
    model = SkipBatch(skip, lr=LR, momentum=momentum)
    trainer = make_trainer(callbacks=[SAM(rho=rho), around])
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert_params_equal(around.before[skip], around.after[skip])

    batches = batches_of(make_loader(N_EXAMPLES, BATCH))
    n = len(batches)
    expected = ref_train(TinyModule().net, batches, [LR] * n, rho, momentum=momentum, skip={skip})
    assert_params_equal({k.removeprefix("net."): v for k, v in params_of(model).items()}, expected, exact=False)

    auto_model = SkipBatch(skip, lr=LR, momentum=momentum)
    auto_trainer = make_trainer()
    auto_trainer.fit(auto_model, make_loader(N_EXAMPLES, BATCH))
    assert trainer.global_step == auto_trainer.global_step == n
    # The automatic run skipped the same batch the same way (its reference: plain SGD without batch `skip`).
    plain = {k: v for k, v in params_of(TinyModule().net).items()}
    bufs = {}
    for i, b in enumerate(batches):
        if i == skip:
            continue
        _, g = ref_loss_and_grads(TinyModule().net, plain, b)
        for k in plain:
            bufs[k] = g[k].clone() if k not in bufs else momentum * bufs[k] + g[k]
            plain[k] = plain[k] - LR * bufs[k]
    assert_params_equal({k.removeprefix("net."): v for k, v in params_of(auto_model).items()}, plain, exact=False)


class BadReturn(TinyModule):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return self.value


@pytest.mark.parametrize("value", ["loss", 1.5, {"not_loss": torch.tensor(1.0)}], ids=["str", "float", "dict-no-loss"])
def test_training_step_returning_a_non_loss_is_a_clear_error(value):
    with pytest.raises(MisconfigurationException, match="must return the loss") as info:
        make_trainer(callbacks=[SAM()]).fit(BadReturn(value), make_loader(N_EXAMPLES, BATCH))
    assert type(value).__name__ in str(info.value)


@pytest.mark.parametrize("entry", ["callback", "module"])
def test_module_is_given_back_after_fit(entry):
    if entry == "callback":
        model, callbacks, cls = TinyModule(lr=LR), [SAM()], TinyModule
    else:
        model, callbacks, cls = SAMTiny(lr=LR), [], SAMTiny
    recorder = StepRecorder()
    trainer = make_trainer(callbacks=callbacks + [recorder], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    steps = 2 * (N_EXAMPLES // BATCH) // 2
    assert len(recorder.step_lrs) == steps  # on_before_optimizer_step fired once per optimizer step
    assert trainer.global_step == steps
    assert model.automatic_optimization is True
    assert "training_step" not in model.__dict__
    assert "on_before_optimizer_step" not in model.__dict__
    assert model.training_step.__func__ is cls.training_step
    assert model.on_before_optimizer_step.__func__ is cls.on_before_optimizer_step
    # The module trains normally afterwards, in automatic optimization, continuing the step count.
    trainer2 = make_trainer(max_epochs=1)
    trainer2.fit(TinyModule(lr=LR) if entry == "module" else model, make_loader(N_EXAMPLES, BATCH))
    assert trainer2.global_step == N_EXAMPLES // BATCH
