"""The SAM variants against hand references (``reference_variants``), in all three faces; their cost (passes per
step), their resume, and their bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers import TinyModule, assert_params_equal, batches_of, make_loader, make_net, make_trainer, params_of
from lightning_sam import SAM, SAMModule, SAMOptimizer
from lightning_sam.variants import AESAM, ASAM, ESAM, MSAM, LookSAM, RandomSAM
from lightning_sam.variants.binding import bind_variant
from reference_variants import reference_variant_run

LR, RHO, MOMENTUM, N, BATCH, STEPS = 0.1, 0.1, 0.9, 64, 8, 8  # one epoch of 8 steps

VARIANTS = {
    # name: (factory, reference name, knobs)
    "looksam": (lambda: LookSAM(k=3, alpha=0.7), "looksam", {"k": 3, "alpha": 0.7}),
    "random": (lambda: RandomSAM(p=0.5, seed=3), "random", {"p": 0.5, "seed": 3}),
    "aesam": (lambda: AESAM(c=0.5, delta=0.9), "aesam", {"c": 0.5, "delta": 0.9}),
    "msam": (lambda: MSAM(), "msam", {}),
    "esam-swp": (lambda: ESAM(beta=0.5, gamma=1.0, seed=2), "esam", {"beta": 0.5, "gamma": 1.0, "seed": 2}),
    "esam": (lambda: ESAM(beta=0.5, gamma=0.5, seed=2), "esam", {"beta": 0.5, "gamma": 0.5, "seed": 2}),
}


class ExampleLosses(TinyModule):
    """Returns the per-example losses too (what ESAM's data selection needs); counts its calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, y = batch
        losses = F.mse_loss(self(x), y, reduction="none")
        return {"loss": losses.mean(), "losses": losses}


class SAMExampleLosses(SAMModule, ExampleLosses):
    pass


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)


BASES = {"sgd": _sgd, "adamw": _adamw}


def _run_face(face: str, variant, base=_sgd):
    batches = batches_of(make_loader(N, BATCH))[:STEPS]
    if face == "samoptimizer":
        model = ExampleLosses()
        opt = SAMOptimizer(model.parameters(), lambda groups: base(groups), rho=RHO, variant=variant)
        for x, y in batches:
            if variant.needs_example_losses:

                def closure(indices=None, x=x, y=y):
                    xs, ys = (x, y) if indices is None else (x[indices], y[indices])
                    return F.mse_loss(model(xs), ys, reduction="none")

            else:

                def closure(x=x, y=y):
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    return loss

            opt.step(closure)
        return model
    if face == "callback":
        model, callbacks = ExampleLosses(optimizer_factory=base), [SAM(rho=RHO, variant=variant)]
    else:
        model, callbacks = SAMExampleLosses(optimizer_factory=base, rho=RHO, variant=variant), []
    make_trainer(callbacks=callbacks, max_steps=STEPS).fit(model, make_loader(N, BATCH))
    return model


@pytest.mark.parametrize("face", ["callback", "mixin", "samoptimizer"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_hand_reference(name, face):
    factory, reference, knobs = VARIANTS[name]
    model = _run_face(face, factory())
    batches = batches_of(make_loader(N, BATCH))[:STEPS]
    expected, sam_steps = reference_variant_run(make_net(0), batches, reference, RHO, _sgd, knobs)
    assert 0 < sum(sam_steps) <= len(sam_steps)
    if name in ("looksam", "random", "aesam"):
        assert not all(sam_steps)  # the schedule really mixes SAM and plain steps
    got = {k.removeprefix("net."): v for k, v in params_of(model).items()}
    assert_params_equal(got, expected, exact=False, atol=2e-5)
    # ... and differs from plain SAM (so the variant's own rule was exercised).
    plain, _ = reference_variant_run(make_net(0), batches, "sam", RHO, _sgd)
    assert max((got[n] - plain[n]).abs().max().item() for n in plain) > 1e-4


@pytest.mark.parametrize("face", ["callback", "samoptimizer"])
def test_msam_climbs_along_adamw_momentum(face):
    model = _run_face(face, MSAM(), base=_adamw)
    batches = batches_of(make_loader(N, BATCH))[:STEPS]
    expected, _ = reference_variant_run(make_net(0), batches, "msam", RHO, _adamw)
    got = {k.removeprefix("net."): v for k, v in params_of(model).items()}
    assert_params_equal(got, expected, exact=False, atol=2e-5)


def test_asam_variant_is_adaptive_sam():
    a = _run_face("callback", ASAM())
    model = ExampleLosses(optimizer_factory=_sgd)
    make_trainer(callbacks=[SAM(rho=RHO, adaptive=True)], max_steps=STEPS).fit(model, make_loader(N, BATCH))
    assert_params_equal(params_of(a), params_of(model))


@pytest.mark.parametrize(
    "variant, steps, calls",
    [
        (LookSAM(k=4), 8, 8 + 2),  # SAM at t = 0, 4: two passes there, one elsewhere
        (MSAM(), 8, 8),
        (RandomSAM(p=0.0), 8, 8),
        (RandomSAM(p=1.0), 8, 16),
    ],
    ids=["looksam", "msam", "random-p0", "random-p1"],
)
def test_passes_per_step(variant, steps, calls):
    model = ExampleLosses(optimizer_factory=_sgd)
    make_trainer(callbacks=[SAM(rho=RHO, variant=variant)], max_steps=steps).fit(model, make_loader(N, BATCH))
    assert model.calls == calls


def test_looksam_in_between_steps_take_one_backward():
    """Between its SAM steps, LookSAM runs one forward and one backward through the network."""
    model = ExampleLosses(optimizer_factory=_sgd)
    backwards = []
    model.net[2].register_full_backward_hook(lambda module, grad_in, grad_out: backwards.append(1))
    make_trainer(callbacks=[SAM(rho=RHO, variant=LookSAM(k=4))], max_steps=8).fit(model, make_loader(N, BATCH))
    assert len(backwards) == 8 + 2


class WeightsAt(Callback):
    def __init__(self):
        self.final = None

    def on_train_end(self, trainer, pl_module):
        self.final = params_of(pl_module)


@pytest.mark.parametrize("face", ["callback", "mixin", "samoptimizer"])
@pytest.mark.parametrize("name", ["looksam", "random", "aesam", "esam"])
def test_resume_is_exact(tmp_path, name, face):
    factory = VARIANTS[name][0]

    def build():
        variant = factory()
        if face == "callback":
            return ExampleLosses(), [SAM(rho=RHO, variant=variant)]
        if face == "mixin":
            return SAMExampleLosses(rho=RHO, variant=variant), []

        def make(params):
            return SAMOptimizer(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, variant=variant)

        return ExampleLosses(optimizer_factory=make), [SAM()]

    def fit(steps, ckpt=None, save=False):
        model, callbacks = build()
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1))
        trainer = make_trainer(callbacks=callbacks, max_steps=steps, max_epochs=100, enable_checkpointing=save)
        trainer.fit(model, make_loader(32, BATCH), ckpt_path=ckpt)  # 4 steps per epoch: resume at an epoch's end
        return model

    straight = fit(8)
    fit(4, save=True)
    resumed = fit(8, ckpt=str(tmp_path / "step=4.ckpt"))
    assert_params_equal(params_of(resumed), params_of(straight))


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LookSAM(k=0), "`k` must be an integer >= 1"),
        (lambda: LookSAM(alpha=-1.0), "`alpha`"),
        (lambda: RandomSAM(p=1.5), r"`p` must be a number in \[0, 1\]"),
        (lambda: RandomSAM(p=0.5, p_end=0.1), "go together"),
        (lambda: ESAM(beta=0.0), r"`beta` must be a number in \(0, 1\]"),
        (lambda: ESAM(gamma=1.2), r"`gamma` must be a number in \(0, 1\]"),
        (lambda: AESAM(c=-1.0), "`c` must be a finite number >= 0"),
        (lambda: AESAM(delta=1.0), r"`delta` must be a number in \[0, 1\)"),
    ],
)
def test_out_of_range_knobs_are_refused_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("face", ["callback", "mixin", "samoptimizer"])
def test_msam_without_momentum_is_refused_before_training(face):
    def plain_sgd(params):
        return torch.optim.SGD(params, lr=LR)

    model = ExampleLosses(optimizer_factory=plain_sgd)
    before = params_of(model)
    with pytest.raises(ValueError, match="MSAM climbs along the base optimizer's momentum.*momentum > 0"):
        if face == "samoptimizer":
            SAMOptimizer(model.parameters(), torch.optim.SGD, lr=LR, variant=MSAM())
        elif face == "callback":
            make_trainer(callbacks=[SAM(variant=MSAM())], max_steps=2).fit(model, make_loader(N, BATCH))
        else:
            mixin = SAMExampleLosses(optimizer_factory=plain_sgd, variant=MSAM())
            make_trainer(max_steps=2).fit(mixin, make_loader(N, BATCH))
    assert_params_equal(params_of(model), before)


def test_aesam_is_refused_under_distributed_training():
    with pytest.raises(ValueError, match="cannot run under distributed training"):
        bind_variant(AESAM(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), None, world_size=2)
    bind_variant(LookSAM(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), None, world_size=2)


def test_msam_refuses_m():
    with pytest.raises(ValueError, match="does not take `m`"):
        SAM(m=2, variant=MSAM())


def test_esam_selection_without_per_example_losses_is_a_clear_error():
    with pytest.raises(Exception, match="'losses' \\(the per-example losses"):
        make_trainer(callbacks=[SAM(variant=ESAM(gamma=0.5))], max_steps=1).fit(TinyModule(), make_loader(N, BATCH))


def test_not_a_variant_is_refused():
    with pytest.raises(TypeError, match="instance of a class in `lightning_sam.variants`"):
        SAM(variant=LookSAM)
