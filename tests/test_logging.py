"""What SAM logs, and that the user's logging and torchmetrics see the unperturbed first pass only.

References are computed by hand along the whole trajectory (SGD + SAM with functional_call and a float64 ε), never
read back from the run; tolerances are float32 rounding (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import csv

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torchmetrics import CatMetric, MeanMetric, SumMetric

from helpers import StepRecorder, TinyModule, batches_of, make_loader, make_trainer, ref_sam_step
from lightning_sam import SAM, SAMModule

LR, RHO = 0.1, 0.2
N_EXAMPLES, BATCH = 16, 4


def reference_trajectory(n_steps: int, rho: float = RHO, lr: float = LR):
    """Per step of plain SGD + SAM: (L(w), L(w+ε), ‖g‖) at the weights the step starts from."""
    net = TinyModule().net
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    batches = batches_of(make_loader(N_EXAMPLES, BATCH))
    out = []
    for k in range(n_steps):
        loss, ploss, norm, pgrads = ref_sam_step(net, params, batches[k % len(batches)], rho)
        out.append((loss.item(), ploss.item(), norm.item()))
        params = {n: p - lr * pgrads[n] for n, p in params.items()}
    return out


def _close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= 1e-6 + 1e-5 * abs(expected)


def test_logged_values_in_csv_match_hand_computed_reference(tmp_path):
    """train_loss is L(w) (first pass), sam/perturbed_loss L(w+ε), sam/sharpness their difference, sam/grad_norm ‖g‖."""
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(callbacks=[SAM(rho=RHO)], logger=logger, log_every_n_steps=1, max_epochs=2)
    trainer.fit(TinyModule(lr=LR), make_loader(N_EXAMPLES, BATCH))
    n_steps = 2 * N_EXAMPLES // BATCH

    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")}
        by_step.setdefault(int(row["step"]), {}).update(values)
    assert sorted(by_step) == list(range(n_steps))

    reference = reference_trajectory(n_steps)
    for step, (loss, ploss, norm) in enumerate(reference):
        logged = by_step[step]
        # The reference's perturbed loss is clearly different: logging L(w+ε) as train_loss would fail here.
        assert abs(ploss - loss) > 1e-3
        assert _close(logged["train_loss"], loss), (step, logged["train_loss"], loss)
        assert _close(logged["sam/perturbed_loss"], ploss), (step, logged["sam/perturbed_loss"], ploss)
        assert _close(logged["sam/sharpness"], ploss - loss), (step, logged["sam/sharpness"], ploss - loss)
        assert _close(logged["sam/grad_norm"], norm), (step, logged["sam/grad_norm"], norm)


def test_callback_metrics_after_each_batch_match_reference():
    """The same through ``trainer.callback_metrics`` read in ``on_train_batch_end`` (no logger at all)."""
    recorder = StepRecorder()
    trainer = make_trainer(callbacks=[SAM(rho=RHO), recorder], max_epochs=1)
    trainer.fit(TinyModule(lr=LR), make_loader(N_EXAMPLES, BATCH))
    reference = reference_trajectory(N_EXAMPLES // BATCH)
    assert len(recorder.batch_end_metrics) == len(reference)
    for metrics, (loss, ploss, norm) in zip(recorder.batch_end_metrics, reference):
        assert _close(metrics["train_loss"], loss)
        assert _close(metrics["sam/perturbed_loss"], ploss)
        assert _close(metrics["sam/sharpness"], ploss - loss)
        assert _close(metrics["sam/grad_norm"], norm)


class MetricModule(TinyModule):
    """Updates torchmetrics in training_step: they must count each batch once, with the first-pass values."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.examples = SumMetric()
        self.losses = CatMetric()
        self.mean_loss = MeanMetric()
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        x, _ = batch
        loss = super().training_step(batch, batch_idx)
        self.examples.update(x.shape[0])
        self.losses.update(loss.detach())
        self.mean_loss(loss.detach())  # forward: update + batch value
        self.log("mean_loss", self.mean_loss, on_step=False, on_epoch=True)
        return loss


def test_torchmetrics_count_each_batch_once_with_first_pass_values():
    epochs = 2
    model = MetricModule(lr=LR)
    recorder = StepRecorder()
    trainer = make_trainer(callbacks=[SAM(rho=RHO), recorder], max_epochs=epochs)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    n_steps = epochs * N_EXAMPLES // BATCH
    reference = reference_trajectory(n_steps)

    assert model.calls == 2 * n_steps  # the training_step really ran twice per step
    assert model.examples.compute().item() == epochs * N_EXAMPLES  # not twice that
    losses = model.losses.compute()
    assert losses.shape == (n_steps,)
    torch.testing.assert_close(losses, torch.tensor([r[0] for r in reference]), rtol=1e-5, atol=1e-6)
    # The epoch value Lightning logs from the MeanMetric: the mean of the last epoch's first-pass losses.
    last_epoch = [r[0] for r in reference[n_steps // 2 :]]
    assert _close(trainer.callback_metrics["mean_loss"].item(), sum(last_epoch) / len(last_epoch))


class SAMTiny(SAMModule, TinyModule):
    pass


@pytest.mark.parametrize("entry", ["callback", "module"])
def test_log_false_logs_no_sam_keys(tmp_path, entry):
    if entry == "callback":
        model, callbacks = TinyModule(lr=LR), [SAM(rho=RHO, log=False)]
    else:
        model, callbacks = SAMTiny(rho=RHO, log_sam=False, lr=LR), []
    recorder = StepRecorder()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(callbacks=callbacks + [recorder], logger=logger, log_every_n_steps=1)
    trainer.fit(model, make_loader(N_EXAMPLES, BATCH))
    assert trainer.global_step == N_EXAMPLES // BATCH
    for metrics in recorder.batch_end_metrics:
        assert "train_loss" in metrics
        assert not [k for k in metrics if k.startswith("sam/")], metrics
    assert not [k for k in trainer.logged_metrics if k.startswith("sam/")]
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "train_loss" in header and not [k for k in header if k.startswith("sam/")], header
    # And SAM still ran: the weights are the hand-computed SAM ones, not plain SGD's.
    # (checked cheaply: the first logged train_loss is L(w0), the second is L(w1) with w1 from the SAM gradient)
    reference = reference_trajectory(2)
    assert _close(recorder.batch_end_metrics[1]["train_loss"], reference[1][0])
