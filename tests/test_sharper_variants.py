"""GSAM, Friendly-SAM, SAM-ON, ρ schedules and the same randomness in both passes: against hand references
(``reference_variants``) in the callback, the mixin and SAMOptimizer, with SGD-momentum and AdamW bases."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import D_IN, TinyModule, assert_params_equal, batches_of, make_loader, make_trainer, params_of
from lightning_sam import SAM, SAMModule, SAMOptimizer
from lightning_sam.variants import (
    GSAM,
    SAMON,
    ConstantRho,
    CosineRho,
    FriendlySAM,
    LinearRho,
    LRTiedRho,
    ParamSelection,
)
from lightning_sam.variants import SAM as PlainSAM
from reference_variants import reference_variant_run

LR, RHO, N, BATCH, STEPS = 0.1, 0.1, 64, 8, 8


def ln_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


def _scheduler(opt):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), "interval": "step"}


class LN(TinyModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = ln_net()


class SAMLN(SAMModule, LN):
    pass


BASES = {
    "sgd": lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.01),
}
LRS = {"sgd": [LR * 0.5 ** (t // 2) for t in range(STEPS)], "adamw": [0.01 * 0.5 ** (t // 2) for t in range(STEPS)]}

VARIANTS = {
    "gsam": (lambda: GSAM(alpha=0.3, rho_max=0.2, rho_min=0.02), {"alpha": 0.3, "rho_max": 0.2, "rho_min": 0.02}),
    "fsam": (lambda: FriendlySAM(sigma=1.0, lmbda=0.6), {"sigma": 1.0, "lmbda": 0.6}),
    "samon": (lambda: SAMON(), {"selected": ["1.weight", "1.bias"]}),
}


def _run(face: str, variant, base: str):
    make = BASES[base]
    batches = batches_of(make_loader(N, BATCH))[:STEPS]
    if face == "samoptimizer":
        model = LN()
        opt = SAMOptimizer(model.parameters(), make, rho=RHO, variant=variant, model=model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for x, y in batches:

            def closure(x=x, y=y):
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            sched.step()
        return model
    if face == "callback":
        model, callbacks = LN(optimizer_factory=make, scheduler=_scheduler), [SAM(rho=RHO, variant=variant)]
    else:
        model, callbacks = SAMLN(optimizer_factory=make, scheduler=_scheduler, rho=RHO, variant=variant), []
    make_trainer(callbacks=callbacks, max_steps=STEPS).fit(model, make_loader(N, BATCH))
    return model


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("face", ["callback", "mixin", "samoptimizer"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_hand_reference(name, face, base):
    factory, knobs = VARIANTS[name]
    model = _run(face, factory(), base)
    batches = batches_of(make_loader(N, BATCH))[:STEPS]
    expected, _ = reference_variant_run(ln_net(), batches, name, RHO, BASES[base], knobs, lrs=LRS[base])
    got = {k.removeprefix("net."): v for k, v in params_of(model).items()}
    assert_params_equal(got, expected, exact=False, atol=2e-5)
    plain, _ = reference_variant_run(ln_net(), batches, "sam", RHO, BASES[base], lrs=LRS[base])
    assert max((got[n] - plain[n]).abs().max().item() for n in plain) > 1e-5


# ------------------------------------------------------------------------------------------------------- SAM-ON
def test_samon_leaves_unselected_weights_at_w_and_scales_epsilon_over_the_selected():
    model = LN(optimizer_factory=BASES["sgd"])
    seen = []

    def record(module, args, output):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    model.net.register_forward_hook(record)
    make_trainer(callbacks=[SAM(rho=RHO, variant=SAMON())], max_steps=1).fit(model, make_loader(N, BATCH))
    at_w, at_w_eps = seen[0], seen[1]
    selected = {"net.1.weight", "net.1.bias"}
    for name in at_w:
        if name not in selected:
            assert torch.equal(at_w[name], at_w_eps[name]), name  # bit for bit at w
    norm = torch.sqrt(sum(((at_w_eps[n] - at_w[n]).double() ** 2).sum() for n in selected))
    assert float(norm) == pytest.approx(RHO, rel=1e-5)


def test_param_selection_by_name_pattern_and_predicate():
    net = ln_net()
    assert [
        n for n, p in net.named_parameters() if any(p is q for q in ParamSelection(name_pattern="bias$").select(net))
    ] == [
        "0.bias",
        "1.bias",
        "3.bias",
    ]
    chosen = ParamSelection(predicate=lambda name, p: p.dim() == 2).select(net)
    assert len(chosen) == 2


def test_bad_selections_are_refused():
    with pytest.raises(ValueError, match="Unknown module type 'BatchNorm9d'"):
        ParamSelection(module_types=["BatchNorm9d"])
    with pytest.raises(ValueError, match="needs `module_types`, `name_pattern` or `predicate`"):
        ParamSelection()
    model = TinyModule(optimizer_factory=BASES["sgd"])  # no normalization layer
    before = params_of(model)
    with pytest.raises(ValueError, match="matches no parameter of TinyModule"):
        make_trainer(callbacks=[SAM(variant=SAMON())], max_steps=2).fit(model, make_loader(N, BATCH))
    assert_params_equal(params_of(model), before)
    with pytest.raises(ValueError, match="matches no parameter"):
        SAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, variant=SAMON(), model=model)


# ------------------------------------------------------------------------------------------------- ρ schedules
def test_schedules_follow_their_formulas_and_never_go_negative():
    linear = LinearRho(start=0.1, end=0.3, total_steps=10, warmup_steps=2)
    assert [round(linear(t, 0.1), 6) for t in (0, 1, 5, 10, 20)] == [0.05, 0.12, 0.2, 0.3, 0.3]
    cosine = CosineRho(start=0.3, end=0.1, total_steps=10)
    assert cosine(0, 0.1) == pytest.approx(0.3) and cosine(5, 0.1) == pytest.approx(0.2) and cosine(10, 0.1) == 0.1
    assert ConstantRho(0.2, warmup_steps=4)(1, 0.1) == pytest.approx(0.1)
    tied = LRTiedRho(rho_max=0.2, rho_min=0.05, lr_min=0.01)
    warmup = [0.0, 0.001, 0.005, 0.1]  # a warm-up that starts below lr_min: big_vision's ρ went negative here
    values = [tied(t, lr) for t, lr in enumerate(warmup)]
    assert min(values) >= 0.05 and values[-1] == pytest.approx(0.2)
    assert tied(4, 0.055) == pytest.approx(0.05 + 0.15 * 0.5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GSAM(alpha=-0.1), "`alpha` must be a finite number >= 0"),
        (lambda: GSAM(rho_max=0.05, rho_min=0.1), r"`rho_min` \(0.1\) must not exceed `rho_max` \(0.05\)"),
        (lambda: LRTiedRho(rho_max=0.1, rho_min=-0.01), "`rho_min` must be a finite number >= 0"),
        (lambda: LinearRho(start=0.1, end=0.2, total_steps=0), "`total_steps` must be an integer >= 1"),
        (lambda: FriendlySAM(lmbda=1.0), r"`lmbda` must be a number in \[0, 1\)"),
        (lambda: FriendlySAM(sigma=-1.0), "`sigma` must be a finite number >= 0"),
    ],
)
def test_bad_knobs_are_refused_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_linear_rho_schedule_in_the_callback_matches_the_reference():
    schedule_steps = [0.05 + (0.25 - 0.05) * min(t, 6) / 6 for t in range(STEPS)]
    model = LN(optimizer_factory=BASES["sgd"])
    variant = PlainSAM(rho_schedule=LinearRho(start=0.05, end=0.25, total_steps=6))
    make_trainer(callbacks=[SAM(rho=RHO, variant=variant)], max_steps=STEPS).fit(model, make_loader(N, BATCH))
    # By hand: SAM with ρ_t per step (GSAM's reference with α = 0 and ρ fixed per step is plain SAM).
    batches = batches_of(make_loader(N, BATCH))[:STEPS]
    net = ln_net()
    params = None
    for t in range(STEPS):
        if params is not None:
            with torch.no_grad():
                for name, p in net.named_parameters():
                    p.copy_(params[name])
        params, _ = reference_variant_run(net, batches[t : t + 1], "sam", schedule_steps[t], BASES["sgd"])
        break
    got = {k.removeprefix("net."): v for k, v in params_of(model).items()}
    # A whole-run reference: momentum crosses steps, so run it in one go with a per-step ρ.
    expected = _sam_with_rho_per_step(ln_net(), batches, schedule_steps)
    assert_params_equal(got, expected, exact=False, atol=2e-5)


def _sam_with_rho_per_step(net, batches, rhos):
    from reference_variants import _grads, _sam_eps, _shift

    names = [n for n, _ in net.named_parameters()]
    leaves = [p.detach().clone().requires_grad_(True) for _, p in net.named_parameters()]
    opt = BASES["sgd"](leaves)
    for (x, y), rho in zip(batches, rhos):
        params = dict(zip(names, [p.detach() for p in leaves]))
        g = _grads(net, params, x, y)
        final = _grads(net, _shift(params, _sam_eps(g, rho)), x, y)
        for n, p in zip(names, leaves):
            p.grad = final[n].clone()
        opt.step()
    return {n: p.detach() for n, p in zip(names, leaves)}


# ----------------------------------------------------------------------------------------- same randomness
class Dropout(TinyModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(D_IN, 32), nn.Dropout(0.5), nn.Tanh(), nn.Linear(32, 1))
        self.masks = []
        self.net[1].register_forward_hook(lambda m, args, out: self.masks.append((out == 0).clone()))


class SAMDropout(SAMModule, Dropout):
    pass


@pytest.mark.parametrize("face", ["callback", "mixin"])
@pytest.mark.parametrize("same", [True, False])
def test_second_pass_replays_the_first_pass_randomness(face, same):
    if face == "callback":
        model, callbacks = Dropout(), [SAM(rho=RHO, same_randomness=same)]
    else:
        model, callbacks = SAMDropout(rho=RHO, same_randomness=same), []
    make_trainer(callbacks=callbacks, max_steps=3).fit(model, make_loader(N, BATCH))
    pairs = list(zip(model.masks[0::2], model.masks[1::2]))
    assert len(pairs) == 3
    equal = [torch.equal(a, b) for a, b in pairs]
    assert all(equal) if same else not any(equal)
    # Consecutive steps still draw fresh masks.
    assert not torch.equal(pairs[0][0], pairs[1][0])


@pytest.mark.parametrize("same", [True, False])
def test_rng_after_the_step_is_where_the_first_pass_left_it(same):
    model = Dropout()
    x, y = batches_of(make_loader(N, BATCH))[0]
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, same_randomness=same)

    def closure():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    torch.manual_seed(7)
    model(x)  # the first pass alone
    after_one_pass = torch.get_rng_state()
    torch.manual_seed(7)
    opt.step(closure)
    assert torch.equal(torch.get_rng_state(), after_one_pass) == same


# --------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("face", ["callback", "mixin", "samoptimizer"])
@pytest.mark.parametrize("name", ["gsam", "fsam", "linear-rho"])
def test_resume_is_exact(tmp_path, name, face):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def variant():
        if name == "gsam":
            return GSAM(alpha=0.3, rho_max=0.2, rho_min=0.02)
        if name == "fsam":
            return FriendlySAM(sigma=1.0, lmbda=0.6)
        return PlainSAM(rho_schedule=LinearRho(start=0.05, end=0.25, total_steps=6))

    def build():
        if face == "callback":
            return LN(optimizer_factory=BASES["sgd"], scheduler=_scheduler), [SAM(rho=RHO, variant=variant())]
        if face == "mixin":
            return SAMLN(optimizer_factory=BASES["sgd"], scheduler=_scheduler, rho=RHO, variant=variant()), []
        made = variant()

        def make(params):
            return SAMOptimizer(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, variant=made)

        return LN(optimizer_factory=make, scheduler=_scheduler), [SAM()]

    def fit(steps, ckpt=None, save=False):
        model, callbacks = build()
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1))
        trainer = make_trainer(callbacks=callbacks, max_steps=steps, max_epochs=100, enable_checkpointing=save)
        trainer.fit(model, make_loader(32, BATCH), ckpt_path=ckpt)
        return model

    straight = fit(8)
    fit(4, save=True)
    resumed = fit(8, ckpt=str(tmp_path / "step=4.ckpt"))
    assert_params_equal(params_of(resumed), params_of(straight))


@pytest.mark.parametrize("name", ["gsam", "fsam", "looksam"])
def test_fp16_loss_scale_does_not_reach_the_variants(name):
    """Under the fp16 scaler the variants combine unscaled gradients: the run matches the fp32 run (to fp16's
    precision), whereas a scale of 2**10 left on g (or on GSAM's / LookSAM's stored vectors) would be far off."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_sam.variants import LookSAM

    def variant():
        return {"gsam": lambda: GSAM(alpha=0.3, rho_max=0.2), "fsam": lambda: FriendlySAM(lmbda=0.6)}.get(
            name, lambda: LookSAM(k=2)
        )()

    weights = {}
    for precision in ("32", "16"):
        model = LN(optimizer_factory=BASES["sgd"])
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))]
        make_trainer(
            callbacks=[SAM(rho=RHO, variant=variant())], max_steps=STEPS, plugins=plugins if precision == "16" else None
        ).fit(model, make_loader(N, BATCH))
        weights[precision] = params_of(model)
    moved = max(
        (weights["32"][n] - ln_params[n]).abs().max().item()
        for n, ln_params in [(n, params_of(LN())) for n in weights["32"]]
    )
    assert moved > 1e-2
    assert_params_equal(weights["16"], weights["32"], exact=False, atol=2e-3)


# ------------------------------------------------------------------------------------ found by a second review
class OverflowOnce(LN):
    """The first pass of step 3 overflows under fp16 (its loss times 1e30)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.calls += 1
        return loss * 1e30 if self.trainer.global_step == 3 and self.calls % 2 == 1 else loss


@pytest.mark.parametrize("name", ["fsam", "aesam"])
def test_an_fp16_overflow_does_not_poison_a_variant_state(name):
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_sam.variants import AESAM

    variant = FriendlySAM(lmbda=0.6) if name == "fsam" else AESAM(c=0.0)
    model = OverflowOnce(optimizer_factory=BASES["sgd"])
    moved = []

    class Moves(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = params_of(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = params_of(pl_module)
            moved.append(any(not torch.equal(self.before[n], after[n]) for n in after))

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    make_trainer(callbacks=[SAM(rho=RHO, variant=variant), Moves()], max_steps=8, plugins=[plugin]).fit(
        model, make_loader(N, BATCH)
    )
    assert moved == [True, True, True, False, True, True, True, True]  # only the overflowing step is skipped
    if name == "fsam":
        assert all(torch.isfinite(m).all() for m in variant.momentum.values())
    else:
        assert variant.mean is not None and float(variant.mean) == float(variant.mean)  # not NaN


def test_samoptimizer_schedules_count_steps_from_zero_in_both_apis():
    expected = [0.025, 0.05, 0.075, 0.1]
    for api in ("closure", "first-second"):
        model = LN()
        opt = SAMOptimizer(model.parameters(), torch.optim.SGD, lr=LR, rho=0.1, variant=PlainSAM(ConstantRho(0.1, 4)))
        radii = []
        for x, y in batches_of(make_loader(N, BATCH))[:4]:
            before = [p.detach().clone() for p in model.parameters()]
            F.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            radii.append(float(torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))))
            if api == "closure":
                opt.restore()
                opt.zero_grad()

                def closure(x=x, y=y):
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                F.mse_loss(model(x), y).backward()
                opt.second_step(zero_grad=True)
        assert radii == pytest.approx(expected, rel=1e-5), api


def test_lr_tied_rho_rises_with_a_warm_up_to_the_scheduler_peak():
    layer = nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4)
    variant = GSAM(rho_max=0.2, rho_min=0.02)
    rhos = []
    for step in range(6):
        rhos.append(variant.rho_factor(step, opt.param_groups[0], 0.2) * 0.2)
        opt.step()
        warmup.step()
    assert rhos[0] == pytest.approx(0.02 + 0.18 * 0.1) and rhos[-1] == pytest.approx(0.2)
    assert rhos == sorted(rhos) and min(rhos) >= 0.02


def test_msam_honours_interval():
    from lightning_sam.variants import MSAM

    model = LN(optimizer_factory=BASES["sgd"])
    sam = SAM(rho=RHO, interval=2, variant=MSAM())
    make_trainer(callbacks=[sam], max_steps=6).fit(model, make_loader(N, BATCH))
    assert (sam.counters.sam_steps, sam.counters.plain_steps) == (3, 3)


def test_same_randomness_with_example_selection_is_refused():
    from lightning_sam.variants import ESAM

    with pytest.raises(ValueError, match="`same_randomness=True` cannot hold with ESAM"):
        SAM(variant=ESAM(gamma=0.5), same_randomness=True)
    model = LN()
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, lr=LR, same_randomness=True)
    x, y = batches_of(make_loader(N, BATCH))[0]
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="must run that pass itself"):
        opt.step(lambda: F.mse_loss(model(x), y))


@pytest.mark.parametrize("face", ["callback", "samoptimizer"])
def test_float64_models_train(face):
    batches = batches_of(make_loader(N, BATCH))[:2]
    model = LN().double()
    if face == "callback":
        make_trainer(callbacks=[SAM(rho=RHO)], max_steps=2, precision="64-true").fit(model, make_loader(N, BATCH))
    else:
        opt = SAMOptimizer(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO)
        for x, y in batches:
            opt.step(lambda x=x, y=y: F.mse_loss(model(x.double()), y.double()).backward())
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


def test_samon_selection_outside_the_optimizer_is_refused():
    class HeadOnly(LN):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net[3].parameters(), lr=LR)

    with pytest.raises(ValueError, match="selects no parameter that is trained by the optimizer"):
        make_trainer(callbacks=[SAM(variant=SAMON())], max_steps=1).fit(HeadOnly(), make_loader(N, BATCH))


def test_resuming_a_samoptimizer_variant_does_not_warn(tmp_path, recwarn):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_sam.variants import LookSAM

    def fit(steps, ckpt=None):
        def make(params):
            return SAMOptimizer(params, torch.optim.SGD, rho=RHO, lr=LR, variant=LookSAM(k=2))

        callbacks = [SAM(), ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)]
        make_trainer(callbacks=callbacks, max_steps=steps, max_epochs=10, enable_checkpointing=True).fit(
            LN(optimizer_factory=make), make_loader(32, BATCH), ckpt_path=ckpt
        )

    fit(4)
    fit(6, ckpt=str(tmp_path / "step=4.ckpt"))
    assert not [w for w in recwarn if "fresh state" in str(w.message)]
