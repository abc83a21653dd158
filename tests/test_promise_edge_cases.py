"""Edge cases of the one-line promise, found by trying to break it (each failed once).

Most cases run SAM with ρ = 1e-30, where w + ε == w in float32: every gradient, log and weight must then equal the
run without SAM bit for bit (or to rounding where SAM's arithmetic differs). The others compare against a hand SAM
step or check that an unsupported use is refused before any training step.
"""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, LearningRateFinder, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from lightning_helpers import trainer
from lightning_sam import SAM, SAMModule

TINY = 1e-30
_g = torch.Generator().manual_seed(0)
BATCHES = [(torch.randn(8, 3, generator=_g), torch.randn(8, generator=_g)) for _ in range(6)]


def loader(batches=None):
    return DataLoader([(x.clone(), y.clone()) for x, y in (batches or BATCHES)], batch_size=None)


class Lin(pl.LightningModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)
        self.grads = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.lin(x).squeeze(-1), y)

    def on_after_backward(self):
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.parameters()])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _faces(cls, mixin, **kwargs):
    mixin_kwargs = {("log_sam" if k == "log" else k): v for k, v in kwargs.items()}
    return {
        "none": (cls(), []),
        "callback": (cls(), [SAM(rho=TINY, **kwargs)]),
        "mixin": (mixin(rho=TINY, **mixin_kwargs), []),
    }


def _assert_faces_match_no_sam(per_face: dict) -> None:
    """Each SAM face's tensors (lists, nested lists) equal those of the run without SAM, element for element."""
    for face in ("callback", "mixin"):
        torch.testing.assert_close(per_face[face], per_face["none"], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ gradients autograd shares
class Shared(pl.LightningModule):
    """W = a + b: autograd returns one tensor object as the gradient of both a and b."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = torch.nn.Parameter(torch.randn(3, generator=g))
        self.b = torch.nn.Parameter(torch.randn(3, generator=g))
        self.grads = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(x @ (self.a + self.b), y)

    def on_after_backward(self):
        self.grads.append((self.a.grad.clone(), self.b.grad.clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _hand_sam(a, b, x, y, rho, m=None):
    def grads(a, b, x, y):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        return torch.autograd.grad(F.mse_loss(x @ (a + b), y), [a, b])

    chunks = [(x, y)] if m is None else [(x[i : i + m], y[i : i + m]) for i in range(0, len(x), m)]
    total = [torch.zeros(3), torch.zeros(3)]
    for cx, cy in chunks:
        ga, gb = grads(a, b, cx, cy)
        norm = torch.sqrt(ga.pow(2).sum() + gb.pow(2).sum())
        sa, sb = grads(a + rho * ga / norm, b + rho * gb / norm, cx, cy)
        total[0] += sa * len(cx) / len(x)
        total[1] += sb * len(cx) / len(x)
    return total


@pytest.mark.parametrize("accumulate, m", [(1, None), (2, None), (1, 4)])
def test_parameters_whose_gradients_autograd_shares(accumulate, m):
    model = Shared()
    a0, b0 = model.a.detach().clone(), model.b.detach().clone()
    x, y = BATCHES[0]
    trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[SAM(rho=0.5, m=m)]).fit(
        model, loader([(x, y)] * accumulate)
    )
    want = _hand_sam(a0, b0, x, y, 0.5, m)
    got = model.grads[-1]
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


class Expanded(Lin):
    """A parameter that enters the loss as ``p.sum()``: autograd returns an expanded (stride-0) gradient."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.1 * self.shift.sum()


class SAMExpanded(SAMModule, Expanded):
    pass


class OutsideModule(Lin):
    """The optimizer trains a tensor that is not a registered parameter of the module."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.temperature = [torch.ones((), requires_grad=True)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.lin(x).squeeze(-1) * self.temperature[0], y)

    def configure_optimizers(self):
        return torch.optim.SGD([*self.parameters(), self.temperature[0]], lr=0.1)


class SAMOutsideModule(SAMModule, OutsideModule):
    pass


@pytest.mark.parametrize("cls, mixin", [(Expanded, SAMExpanded), (OutsideModule, SAMOutsideModule)])
def test_expanded_gradients_and_optimizer_only_tensors_train_as_without_sam(cls, mixin):
    results = {}
    for face, (model, callbacks) in _faces(cls, mixin).items():
        trainer(max_steps=4, callbacks=callbacks).fit(model, loader())
        results[face] = [p.detach().clone() for p in model.parameters()]
        if cls is OutsideModule:
            results[face].append(model.temperature[0].detach().clone())
    assert not torch.equal(results["none"][-1], torch.ones_like(results["none"][-1]) * 0)  # it trained
    _assert_faces_match_no_sam(results)


# ------------------------------------------------------------------------------------ how autograd is used
class Reentrant(Lin):
    def training_step(self, batch, batch_idx):
        x, y = batch
        out = checkpoint(self.lin, x.requires_grad_(), use_reentrant=True)
        return F.mse_loss(out.squeeze(-1), y)


def test_reentrant_checkpoint_is_a_clear_error_not_a_silent_loss():
    with pytest.raises(MisconfigurationException, match="use_reentrant=False"):
        trainer(max_steps=1, callbacks=[SAM()]).fit(Reentrant(), loader())


def test_gradient_hooks_on_parameters_are_refused_before_training():
    model = Lin()
    model.lin.weight.register_hook(lambda grad: grad * 0.5)
    with pytest.raises(ValueError, match="Gradient hooks are registered on \\['lin.weight'\\]"):
        trainer(max_steps=1, callbacks=[SAM()]).fit(model, loader())
    assert model.grads == []


class BackwardTwice(Lin):
    def on_before_backward(self, loss):
        torch.autograd.grad(loss, list(self.parameters()), retain_graph=True)


class SAMBackwardTwice(SAMModule, BackwardTwice):
    pass


def test_the_returned_loss_can_be_back_propagated_twice():
    grads = {}
    for face, (model, callbacks) in _faces(BackwardTwice, SAMBackwardTwice).items():
        trainer(max_steps=2, callbacks=callbacks).fit(model, loader())
        grads[face] = model.grads
    _assert_faces_match_no_sam(grads)


class InPlaceBatch(Lin):
    def training_step(self, batch, batch_idx):
        x, y = batch
        x.sub_(0.5)
        return F.mse_loss(self.lin(x).squeeze(-1), y)


def test_a_batch_changed_in_place_is_refused_at_the_first_step():
    model = InPlaceBatch()
    with pytest.raises(MisconfigurationException, match="changed its batch in place"):
        trainer(max_steps=1, callbacks=[SAM()]).fit(model, loader())
    assert model.grads == []


# ------------------------------------------------------------------------------------ layer state, logging
class Spectral(Lin):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.lin = torch.nn.utils.spectral_norm(torch.nn.Linear(3, 4))
        self.head = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.lin(x)).squeeze(-1), y)


class SAMSpectral(SAMModule, Spectral):
    pass


def test_spectral_norm_state_moves_once_per_step():
    state = {}
    for face, (model, callbacks) in _faces(Spectral, SAMSpectral).items():
        trainer(max_steps=4, callbacks=callbacks).fit(model, loader())
        state[face] = [t.detach().clone() for t in [*model.buffers(), *model.parameters()]]
    _assert_faces_match_no_sam(state)


class CountsExamples(Lin):
    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("examples_seen", float(len(x)), reduce_fx="sum", on_step=False, on_epoch=True)
        self.log("largest_target", y.abs().max(), reduce_fx="max", on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


def test_m_chunks_keep_the_reduction_self_log_was_given():
    metrics = {}
    for name, callbacks in {"none": [], "m=2": [SAM(rho=TINY, m=2)], "m=4": [SAM(rho=TINY, m=4)]}.items():
        t = trainer(max_epochs=1, callbacks=callbacks)
        t.fit(CountsExamples(), loader())
        metrics[name] = {k: float(v) for k, v in t.callback_metrics.items() if not k.startswith("sam/")}
    assert metrics["none"]["examples_seen"] == 48
    assert metrics["m=2"] == metrics["m=4"] == pytest.approx(metrics["none"])


def test_an_unknown_reduction_with_m_is_refused():
    class Median(Lin):
        def training_step(self, batch, batch_idx):
            self.log("odd", 1.0, reduce_fx=torch.median)
            return super().training_step(batch, batch_idx)

    with pytest.raises(MisconfigurationException, match="only 'mean', 'sum', 'max' and 'min'"):
        trainer(max_steps=1, callbacks=[SAM(m=2)]).fit(Median(), loader())


# ------------------------------------------------------------------------------------ around the fit
class PicklesInSetup(Lin):
    def setup(self, stage):
        self.pickled = pickle.dumps(self)
        clone = copy.deepcopy(self)
        optimizer = clone.configure_optimizers()
        self.copy_optimizes_itself = all(
            any(p is q for q in clone.parameters()) for g in optimizer.param_groups for p in g["params"]
        )


def test_the_module_can_be_pickled_and_copied_in_setup():
    model = PicklesInSetup()
    trainer(max_steps=1, callbacks=[SAM()]).fit(model, loader())
    assert model.pickled and model.copy_optimizes_itself


def test_tuner_callbacks_are_refused():
    with pytest.raises(MisconfigurationException, match="LearningRateFinder.*runs its search before SAM"):
        trainer(max_steps=2, callbacks=[SAM(), LearningRateFinder(num_training_steps=5)]).fit(Lin(), loader())


class Sparse(Lin):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 3, sparse=True)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return super().training_step(batch, batch_idx) + self.emb(torch.tensor([1])).sum()


def test_sparse_embeddings_are_refused_before_any_step():
    model = Sparse()
    with pytest.raises(ValueError, match="`emb` has `sparse=True`"):
        trainer(max_steps=1, callbacks=[SAM()]).fit(model, loader())
    assert model.calls == 0


# ------------------------------------------------------------------------------------ SAMModule (manual)
class SkipsOne(Lin):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 1 else super().training_step(batch, batch_idx)


class SAMSkipsOne(SAMModule, SkipsOne):
    pass


def test_mixin_skips_a_none_step_under_fp16_as_automatic_optimization():
    weights = {}
    for face, (model, callbacks) in _faces(SkipsOne, SAMSkipsOne).items():
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        trainer(max_steps=3, callbacks=callbacks, plugins=[plugin]).fit(model, loader())
        weights[face] = model.lin.weight.detach().clone()
    torch.testing.assert_close(weights["mixin"], weights["none"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights["callback"], weights["none"], atol=1e-6, rtol=1e-6)


class NoClosure(Lin):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        pass


class SAMNoClosure(SAMModule, NoClosure):
    pass


@pytest.mark.parametrize("face", ["none", "callback", "mixin"])
def test_an_optimizer_step_that_skips_the_closure_is_lightnings_error(face):
    model, callbacks = _faces(NoClosure, SAMNoClosure)[face]
    with pytest.raises(MisconfigurationException, match="The closure hasn't been executed"):
        trainer(max_steps=2, callbacks=callbacks).fit(model, loader())


class Logs(Lin):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss


class SAMLogs(SAMModule, Logs):
    pass


class StepMetrics(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(float(trainer.callback_metrics["train_loss_step"]))


def test_mixin_logs_under_accumulation_as_automatic_optimization():
    results = {}
    for face, (model, callbacks) in _faces(Logs, SAMLogs, log=False).items():
        recorder = StepMetrics()
        t = trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[*callbacks, recorder])
        t.fit(model, loader())
        results[face] = (float(t.callback_metrics["train_loss_epoch"]), recorder.seen)
    for face in ("callback", "mixin"):
        assert results[face][0] == pytest.approx(results["none"][0], rel=1e-6)
        assert results[face][1] == pytest.approx(results["none"][1], rel=1e-6)


def test_mixin_refuses_a_monitored_step_checkpoint(tmp_path):
    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, monitor="train_loss")
    with pytest.raises(MisconfigurationException, match="monitored `ModelCheckpoint\\(every_n_train_steps"):
        trainer(max_steps=2, callbacks=[checkpoint_cb], enable_checkpointing=True).fit(SAMLogs(), loader())
