"""FlatnessMonitor: it logs the right numbers, when asked, and leaves no trace on the training run (with and without
the SAM callback), plus its DDP semantics on 2 CPU processes (gloo, fork)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sam import SAM
from lightning_sam.diagnostics import hessian_eigenvalues, hessian_trace, sharpness
from lightning_sam.diagnostics.callback import FlatnessMonitor, cross_entropy_loss


class Net(pl.LightningModule):
    """BatchNorm and dropout (so a stolen random number or a moved statistic would change the run), shuffled data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def fit(callbacks, epochs=2, **kwargs):
    torch.manual_seed(42)
    module = Net()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module)
    return trainer, module


@pytest.mark.parametrize("with_sam", [False, True])
def test_the_monitor_leaves_no_trace_on_the_run(with_sam):
    sam = (lambda: [SAM(rho=0.1)]) if with_sam else (lambda: [])
    plain_trainer, plain = fit(sam())
    monitor = FlatnessMonitor(every_n_epochs=1, num_batches=2, trace_probes=3, max_iter=8, spectrum_steps=4)
    trainer, module = fit(sam() + [monitor])
    assert len(monitor.history) == 2
    for (name, a), b in zip(plain.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics, bit for bit
    opt_a, opt_b = plain_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()
    for key, state in opt_a["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_b["state"][key]["momentum_buffer"])
    for key in ("train_loss_step", "train_loss_epoch"):
        assert torch.equal(plain_trainer.callback_metrics[key], trainer.callback_metrics[key])
    assert torch.equal(plain_trainer.callback_metrics["train_loss_epoch"], trainer.logged_metrics["train_loss_epoch"])
    for key in ("flatness/top_eigenvalue", "flatness/trace", "flatness/sharpness"):
        assert key in trainer.callback_metrics
    # The last logged values are those of the diagnostics on the final weights and the held-aside batches.
    last = monitor.history[-1]
    assert last["epoch"] == 1 and last["spectrum"].nodes.shape == (1, 4)
    top = hessian_eigenvalues(module, cross_entropy_loss, monitor.batches, max_iter=8, tol=1e-3)
    assert float(trainer.callback_metrics["flatness/top_eigenvalue"]) == pytest.approx(float(top[0]), rel=1e-6)
    trace = hessian_trace(module, cross_entropy_loss, monitor.batches, num_probes=3, tol=None)
    assert last["trace"] == pytest.approx(trace.trace, rel=1e-6)
    s = sharpness(module, cross_entropy_loss, monitor.batches, rho=0.1 if with_sam else 0.05)
    assert last["sharpness"] == pytest.approx(s, rel=1e-6)


def test_held_aside_batches_are_the_first_training_batches_and_the_data_order_is_kept():
    monitor = FlatnessMonitor(num_batches=2, trace_probes=0, max_iter=4, rho=0)
    seen = []

    class Seen(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].clone())

    fit([Seen()], epochs=1)
    first_run = list(seen)
    seen.clear()
    fit([monitor, Seen()], epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(first_run, seen))  # reading the loader at setup moved no RNG
    assert len(monitor.batches) == 2 and monitor.batches[0][0].shape == (8, 4)
    assert "sharpness" not in monitor.history[0] and "trace" not in monitor.history[0]


@pytest.mark.parametrize("with_sam", [False, True])
def test_every_n_steps_measures_after_the_optimizer_step(with_sam):
    steps = []

    class Steps(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps.append(trainer.global_step)

    monitor = FlatnessMonitor(every_n_steps=3, num_batches=1, trace_probes=0, max_iter=4)
    fit(([SAM(rho=0.1)] if with_sam else []) + [monitor], epochs=2)  # 4 steps per epoch
    assert [h["global_step"] for h in monitor.history] == [3, 6]


def test_rho_m_adaptive_come_from_the_sam_callback_unless_given():
    monitor = FlatnessMonitor(num_batches=1, trace_probes=0, max_iter=4)
    fit([SAM(rho=0.2, m=4, adaptive=True), monitor], epochs=1)
    assert (monitor.history[-1]["rho"], monitor.history[-1]["m"]) == (0.2, 4)
    explicit = FlatnessMonitor(num_batches=1, trace_probes=0, max_iter=4, rho=0.03, m=2)
    fit([SAM(rho=0.2), explicit], epochs=1)
    assert (explicit.history[-1]["rho"], explicit.history[-1]["m"]) == (0.03, 2)
    default = FlatnessMonitor(num_batches=1, trace_probes=0, max_iter=4)
    fit([default], epochs=1)
    assert (default.history[-1]["rho"], default.history[-1]["m"]) == (0.05, None)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="`num_batches` must be an int >= 1"):
        FlatnessMonitor(num_batches=0)
    with pytest.raises(ValueError, match="`k`=5 is larger than `max_iter`=4"):
        FlatnessMonitor(k=5, max_iter=4)
    with pytest.raises(ValueError, match="`loss_fn` must be a callable"):
        FlatnessMonitor(loss_fn="ce")
    with pytest.raises(MisconfigurationException, match="has only 4 batches"):
        fit([FlatnessMonitor(num_batches=5)], epochs=1)


# ------------------------------------------------------------------------------------------------------------ DDP
class Save(pl.Callback):
    def __init__(self, monitor: FlatnessMonitor, out: Path) -> None:
        self.monitor, self.out = monitor, out

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)

    def on_fit_end(self, trainer, pl_module):
        torch.save(
            {
                "history": [{k: v for k, v in h.items() if k != "seconds"} for h in self.monitor.history],
                "batches": self.monitor.batches,
                "state": {k: v.clone() for k, v in pl_module.state_dict().items()},
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class RankNet(Net):
    """Each rank's dataloader draws different data, so rank 1's own first batches differ from rank 0's."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1 + self.trainer.global_rank)
        x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
def test_ddp_every_rank_measures_rank0s_batches_and_logs_the_same_values(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monitor = FlatnessMonitor(num_batches=2, trace_probes=2, max_iter=6)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="fork"),
        callbacks=[SAM(rho=0.1), monitor, Save(monitor, tmp_path)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(42)
    trainer.fit(RankNet())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    g = torch.Generator().manual_seed(1)  # rank 0's data: the first two batches of its unsharded loader
    x = torch.randn(32, 4, generator=g)
    for rank in (r0, r1):
        assert torch.equal(rank["batches"][0][0], x[:8]) and torch.equal(rank["batches"][1][0], x[8:16])
    assert r0["history"] == r1["history"] and len(r0["history"]) == 1
    # And the values are those of the diagnostics on the final weights, computed here in one process.
    module = Net()
    module.load_state_dict(r0["state"])
    top = hessian_eigenvalues(module, cross_entropy_loss, r0["batches"], max_iter=6, tol=1e-3)
    assert r0["history"][0]["top_eigenvalue"] == pytest.approx(float(top[0]), rel=1e-5)
    assert os.environ["MASTER_PORT"] == str(port)
