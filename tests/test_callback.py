"""The Lightning SAM step (callback, mixin, SAMOptimizer) against hand computations."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_helpers import LinReg, initial_weights, linreg_batches, loader, trainer
from lightning_sam import SAM, SAMModule
from reference import functional_sam_grads, linreg_grads, linreg_sam_sgd, sam_epsilon


def _assert_weights(module, w, b, tol=1e-6):
    torch.testing.assert_close(module.lin.weight.detach(), w, rtol=tol * 10, atol=tol)
    torch.testing.assert_close(module.lin.bias.detach(), b, rtol=tol * 10, atol=tol)


class SAMLinReg(SAMModule, LinReg):
    """An existing module, unchanged, behind the mixin."""


class OwnLinReg(SAMModule):
    """The mixin as the only base."""

    def __init__(self, w, b, **sam):
        super().__init__(**sam)
        self.lin = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.lin.weight.copy_(w)
            self.lin.bias.copy_(b)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.lin(x).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": [self.lin.weight]}, {"params": [self.lin.bias], "rho": 0.5}], lr=0.1)


@pytest.mark.parametrize("face", ["callback", "mixin", "mixin-only-base", "sam-optimizer"])
def test_update_matches_hand_computation_with_per_group_rho(face):
    batches = linreg_batches(4)
    w0, b0 = initial_weights()
    w_ref, b_ref = linreg_sam_sgd(w0, b0, batches, lr=0.1, rho_w=0.2, rho_b=0.5)
    callbacks = []
    if face == "callback":
        module, callbacks = LinReg(w0, b0, rho_bias=0.5), [SAM(rho=0.2)]
    elif face == "mixin":
        module = SAMLinReg(w0, b0, rho_bias=0.5, rho=0.2)
    elif face == "mixin-only-base":
        module = OwnLinReg(w0, b0, rho=0.2)
    else:
        module, callbacks = LinReg(w0, b0, rho_bias=0.5, optimizer="sam"), [SAM()]
        module.configure_optimizers_rho = 0.2
    if face == "sam-optimizer":
        from lightning_sam import SAMOptimizer

        module.configure_optimizers = lambda: SAMOptimizer(
            [{"params": [module.lin.weight]}, {"params": [module.lin.bias], "rho": 0.5}],
            torch.optim.SGD,
            rho=0.2,
            lr=0.1,
        )
    t = trainer(callbacks=callbacks)
    t.fit(module, loader(batches))
    _assert_weights(module, w_ref, b_ref)
    assert t.global_step == 4
    assert module.automatic_optimization  # given back as it was
    assert "training_step" not in module.__dict__


def test_adaptive_matches_kwon_et_al():
    batches = linreg_batches(3)
    w0, b0 = initial_weights()
    w_ref, b_ref = linreg_sam_sgd(w0, b0, batches, lr=0.1, rho_w=0.5, adaptive=True, eta=0.1)
    module = LinReg(w0, b0)
    trainer(callbacks=[SAM(rho=0.5, adaptive=True, eta=0.1)]).fit(module, loader(batches))
    _assert_weights(module, w_ref, b_ref)
    w_sam, _ = linreg_sam_sgd(w0, b0, batches, lr=0.1, rho_w=0.5)
    assert not torch.allclose(w_sam, w_ref, atol=1e-4)  # ASAM is not SAM: the test can tell them apart


def test_base_step_starts_from_exactly_w():
    batches = linreg_batches(1)
    w0, b0 = initial_weights()
    module = LinReg(w0, b0, lr=0.0)
    trainer(callbacks=[SAM(rho=1.0)]).fit(module, loader(batches))
    assert torch.equal(module.lin.weight.detach(), w0) and torch.equal(module.lin.bias.detach(), b0)


@pytest.mark.parametrize("interval", [2, 3])
def test_interval_follows_global_step(interval):
    batches = linreg_batches(6)
    w0, b0 = initial_weights()
    w_ref, b_ref = linreg_sam_sgd(w0, b0, batches, lr=0.1, rho_w=0.3, interval=interval)
    module, sam = LinReg(w0, b0), SAM(rho=0.3, interval=interval)
    t = trainer(callbacks=[sam])
    t.fit(module, loader(batches))
    _assert_weights(module, w_ref, b_ref)
    assert t.global_step == 6
    assert sam.counters.sam_steps == len(range(0, 6, interval))
    assert sam.counters.plain_steps == 6 - sam.counters.sam_steps


def test_gradient_accumulation_gives_each_micro_batch_its_own_epsilon():
    batches = linreg_batches(4)
    w, b = initial_weights()
    for window in (batches[:2], batches[2:]):
        hw, hb = torch.zeros_like(w), torch.zeros_like(b)
        for x, y in window:
            gw, gb = linreg_grads(w, b, x, y)
            ew, eb = sam_epsilon([w, b], [gw, gb], [0.3, 0.3])
            pw, pb = linreg_grads(w + ew, b + eb, x, y)
            hw, hb = hw + pw / 2, hb + pb / 2
        w, b = w - 0.1 * hw, b - 0.1 * hb
    module = LinReg(*initial_weights())
    t = trainer(callbacks=[SAM(rho=0.3)], accumulate_grad_batches=2)
    t.fit(module, loader(batches))
    _assert_weights(module, w, b)
    assert t.global_step == 2


def test_m_sharpness_splits_the_batch():
    batches = linreg_batches(2, batch=8)
    w, b = initial_weights()
    for x, y in batches:
        hw, hb = torch.zeros_like(w), torch.zeros_like(b)
        for cx, cy in ((x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])):
            gw, gb = linreg_grads(w, b, cx, cy)
            ew, eb = sam_epsilon([w, b], [gw, gb], [0.3, 0.3])
            pw, pb = linreg_grads(w + ew, b + eb, cx, cy)
            hw, hb = hw + pw * len(cx) / 8, hb + pb * len(cx) / 8
        w, b = w - 0.1 * hw, b - 0.1 * hb
    module = LinReg(*initial_weights())
    trainer(callbacks=[SAM(rho=0.3, m=3)]).fit(module, loader(batches))
    _assert_weights(module, w, b)


def test_gradient_clipping_by_norm_clips_the_final_gradient():
    batches = linreg_batches(3)
    w0, b0 = initial_weights()
    w_ref, b_ref = linreg_sam_sgd(w0, b0, batches, lr=0.1, rho_w=0.2, clip=0.05)
    module = LinReg(w0, b0)
    trainer(callbacks=[SAM(rho=0.2)], gradient_clip_val=0.05).fit(module, loader(batches))
    _assert_weights(module, w_ref, b_ref)
    w_free, _ = linreg_sam_sgd(w0, b0, batches, lr=0.1, rho_w=0.2)
    assert not torch.allclose(w_free, w_ref, atol=1e-3)  # clipping was active


# ---------------------------------------------------------------------------------------------------- BatchNorm
class BNNet(pl.LightningModule):
    def __init__(self, norm: torch.nn.Module, shape: tuple):
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.norm, self.shape = norm, shape
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.norm(self.inp(x).reshape(x.shape[0], *self.shape)).reshape(x.shape[0], 8)
        return self.out(torch.relu(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


BN_KINDS = {
    "bn1d": (lambda: torch.nn.BatchNorm1d(8), (8,)),
    "bn1d-momentum-none": (lambda: torch.nn.BatchNorm1d(8, momentum=None), (8,)),
    "bn2d": (lambda: torch.nn.BatchNorm2d(2), (2, 2, 2)),
    "bn3d": (lambda: torch.nn.BatchNorm3d(1), (1, 2, 2, 2)),
    "lazy": (lambda: torch.nn.LazyBatchNorm1d(), (8,)),
    "sync": (lambda: torch.nn.SyncBatchNorm(2), (2, 2, 2)),
    "instance": (lambda: torch.nn.InstanceNorm2d(2, track_running_stats=True), (2, 2, 2)),
}


def _bn_data():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 4, generator=gen) * 3 + 1, torch.randint(0, 2, (16,), generator=gen)) for _ in range(2)]


def _bn_stats(norm):
    return [norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()]


@pytest.mark.parametrize("kind", list(BN_KINDS))
def test_batchnorm_statistics_come_from_the_first_pass_only(kind):
    factory, shape = BN_KINDS[kind]
    batches = _bn_data()
    torch.manual_seed(0)
    module = BNNet(factory(), shape)
    module(batches[0][0])  # materialise lazy layers
    module.norm.reset_running_stats()
    reference = copy.deepcopy(module)

    # The reference: per step, one training-mode forward at w (then the weights move as the SAM step moves them).
    sam = SAM(rho=0.5)
    trainer(callbacks=[sam], max_steps=1).fit(module, loader(batches[:1]))
    reference.train()
    with torch.no_grad():
        reference(batches[0][0])
    for got, want in zip(_bn_stats(module.norm), _bn_stats(reference.norm)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if kind != "instance":  # InstanceNorm does not count batches
        assert int(module.norm.num_batches_tracked) == 1


def test_batchnorm_policy_both_lets_the_second_pass_update():
    factory, shape = BN_KINDS["bn1d-momentum-none"]
    batches = _bn_data()
    torch.manual_seed(0)
    module = BNNet(factory(), shape)
    first_only = copy.deepcopy(module)
    trainer(callbacks=[SAM(rho=0.5, bn_policy="both")], max_steps=1).fit(module, loader(batches[:1]))
    first_only.train()
    with torch.no_grad():
        first_only(batches[0][0])
    assert int(module.norm.num_batches_tracked) == 2
    assert not torch.allclose(module.norm.running_mean, first_only.norm.running_mean)


# ---------------------------------------------------------------------------------------------------- AMP
class CachedAutocastBF16(MixedPrecision):
    """bf16-mixed with the autocast weight cache ON (Lightning master does this; FSDP mixed precision too)."""

    def __init__(self):
        super().__init__("bf16-mixed", "cpu")

    def autocast_context_manager(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=True)


class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.seen = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.seen.setdefault(batch_idx, []).append(loss.detach().float())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _mlp_data(n=2):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("plugin", ["bf16-mixed", "cached-autocast"])
def test_bf16_matches_an_autocast_reference(plugin):
    batches = _mlp_data(1)
    module = MLP()
    reference = copy.deepcopy(module.net)
    kwargs = {"precision": "bf16-mixed"} if plugin == "bf16-mixed" else {"plugins": [CachedAutocastBF16()]}
    trainer(callbacks=[SAM(rho=0.5)], **kwargs).fit(module, loader(batches))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads, loss, perturbed_loss, _ = functional_sam_grads(reference, F.cross_entropy, batches[0], rho=0.5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p -= 0.1 * grads[name]
    (first, second) = module.seen[0]
    torch.testing.assert_close(first, loss.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(second, perturbed_loss.float(), rtol=1e-2, atol=1e-3)
    assert (second - first).abs() > 1e-2  # the second pass really ran at w + ε, not on stale cached casts
    for p, q in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-2, atol=2e-3)


def test_without_clearing_the_autocast_cache_the_second_pass_would_be_stale(monkeypatch):
    """Shows that the cache test above can fail: with the cache on and never cleared, L(w+ε) reads as L(w)."""
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: None)
    module = MLP()
    trainer(callbacks=[SAM(rho=0.5)], plugins=[CachedAutocastBF16()], max_steps=1).fit(module, loader(_mlp_data(1)))
    first, second = module.seen[0]
    assert torch.equal(first, second)


def _fp16_plugin(init_scale=2.0**12):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device, init_scale=init_scale))


class Overflowing(LinReg):
    """Makes the first pass of one chosen step overflow, and records the weights each pass sees."""

    def __init__(self, *args, overflow_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow_step, self.calls, self.weights_seen = overflow_step, 0, []

    def training_step(self, batch, batch_idx):
        self.weights_seen.append((batch_idx, self.lin.weight.detach().clone()))
        first_pass = self.calls % 2 == 0
        self.calls += 1
        loss = super().training_step(batch, batch_idx)
        return loss * 1e30 if (first_pass and batch_idx == self.overflow_step) else loss


def test_fp16_overflow_in_the_first_pass_skips_the_step_and_never_reaches_the_weights():
    batches = linreg_batches(3)
    w0, b0 = initial_weights()
    module = Overflowing(w0, b0, overflow_step=1)
    plugin = _fp16_plugin()
    sam = SAM(rho=0.2)
    t = trainer(callbacks=[sam], plugins=[plugin], accelerator="auto")
    t.fit(module, loader(batches))
    module.cpu()

    seen = module.weights_seen  # (batch_idx, weight) per pass: 2 per step
    assert [i for i, _ in seen] == [0, 0, 1, 1, 2, 2]
    assert torch.equal(seen[2][1].cpu(), seen[3][1].cpu())  # overflow: the second pass ran at w (ε = 0)
    assert torch.equal(seen[3][1].cpu(), seen[4][1].cpu())  # and the step was skipped
    assert not torch.equal(seen[0][1].cpu(), seen[1][1].cpu())  # a normal step does perturb
    assert int(sam.counters.nonfinite_skips) == 1
    assert t.global_step == 3
    assert plugin.scaler.get_scale() < 2.0**12
    assert torch.isfinite(module.lin.weight).all()
    # Steps 0 and 2 are ordinary SAM steps on the unscaled gradient (fp16 autocast: loose tolerance).
    w_ref, b_ref = linreg_sam_sgd(w0, b0, [batches[0], batches[2]], lr=0.1, rho_w=0.2)
    _assert_weights(module, w_ref, b_ref, tol=5e-3)


def test_fp16_clipping_applies_after_unscaling():
    batches = linreg_batches(3)
    w0, b0 = initial_weights()
    w_ref, b_ref = linreg_sam_sgd(w0, b0, batches, lr=0.1, rho_w=0.2, clip=0.05)
    module = LinReg(w0, b0)
    trainer(callbacks=[SAM(rho=0.2)], plugins=[_fp16_plugin()], gradient_clip_val=0.05, accelerator="auto").fit(
        module, loader(batches)
    )
    module.cpu()
    _assert_weights(module, w_ref, b_ref, tol=5e-3)


# ---------------------------------------------------------------------------------------------------- cost
class _SyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Notes every op that reads a device value back on the host."""

    SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.syncs.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class QuietMLP(MLP):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_sam_step_reads_nothing_back_to_the_host(log, precision):
    recorder = _SyncRecorder()

    class Record(pl.Callback):
        def on_fit_start(self, trainer, pl_module):  # runs after SAM's, so it wraps the installed SAM step
            step = trainer.strategy.training_step
            assert type(step).__name__ == "AutomaticSAMStep"

            def recorded(*args, **kwargs):
                with recorder:
                    return step(*args, **kwargs)

            trainer.strategy.training_step = recorded

    module = QuietMLP()
    trainer(callbacks=[SAM(rho=0.1, log=log), Record()], precision=precision, max_steps=3).fit(
        module, loader(_mlp_data(3))
    )
    assert recorder.syncs == []
