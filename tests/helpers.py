"""Shared pieces for test_schedulers / test_checkpoint / test_logging / test_errors.

A tiny regression network, deterministic data, a quiet CPU Trainer, a callback that records what happens at every
optimizer step, and an independent SAM reference written with ``torch.func.functional_call`` and plain loops (it
never imports lightning_sam).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_helpers import trainer

D_IN = 4


def make_data(n: int = 32, seed: int = 1234) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    w = torch.randn(D_IN, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def make_loader(n: int = 32, batch_size: int = 4, seed: int = 1234) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


def batches_of(loader: DataLoader) -> list[tuple[Tensor, Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, 1))


def net_loss(net: nn.Module, batch) -> Tensor:
    x, y = batch
    return F.mse_loss(net(x).squeeze(-1), y)


class TinyModule(pl.LightningModule):
    """A plain automatic-optimization module: SGD (+momentum), optional scheduler, logs ``train_loss``."""

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = 0.0,
        scheduler: Optional[Callable[[torch.optim.Optimizer], dict]] = None,
        seed: int = 0,
        optimizer_factory: Optional[Callable[[Any], torch.optim.Optimizer]] = None,
    ) -> None:
        super().__init__()
        self.net = make_net(seed)
        self.lr, self.momentum = lr, momentum
        self.scheduler = scheduler
        self.optimizer_factory = optimizer_factory

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(self.parameters())
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}


def make_trainer(**kwargs: Any) -> pl.Trainer:
    """The quiet CPU Trainer of lightning_helpers, deterministic and without a sanity check."""
    return trainer(**{"num_sanity_val_steps": 0, "deterministic": True, **kwargs})


class StepRecorder(Callback):
    """Records, at every optimizer step (``on_before_optimizer_step``), the LR and ``global_step``; and per batch."""

    def __init__(self) -> None:
        self.step_lrs: list[float] = []
        self.step_global: list[int] = []
        self.batch_lrs: list[float] = []
        self.batch_end_metrics: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.step_lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.step_global.append(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch_end_metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def params_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_params_equal(a: dict[str, Tensor], b: dict[str, Tensor], exact: bool = True, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), f"{n}: max diff {(a[n] - b[n]).abs().max().item():.3e}"
        else:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------- reference
def ref_epsilon(grads: dict[str, Tensor], rho: float, epsilon: float = 1e-12) -> dict[str, Tensor]:
    """ε = ρ·g/(‖g‖ + epsilon) over all given gradients, in float64, by plain loops; zero for a zero gradient."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    if norm == 0:
        return {n: torch.zeros_like(g) for n, g in grads.items()}
    return {n: (rho * g.double() / (norm + epsilon)).to(g.dtype) for n, g in grads.items()}


def ref_loss_and_grads(net: nn.Module, params: dict[str, Tensor], batch, loss_fn=net_loss):
    """L(params) and ∇L by name (only for trainable params that receive a gradient), via functional_call."""
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    leaves = {n: p.detach().clone().requires_grad_(n in trainable) for n, p in params.items()}
    x, y = batch
    out = functional_call(net, leaves, (x,))
    loss = F.mse_loss(out.squeeze(-1), y) if loss_fn is net_loss else loss_fn(out, y)
    wrt = [n for n in leaves if n in trainable]
    grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(wrt, grads) if g is not None}


def ref_sam_step(net: nn.Module, params: dict[str, Tensor], batch, rho: float):
    """One SAM evaluation at ``params``: returns (L(w), L(w+ε), ‖g‖, ∇L(w+ε) by name)."""
    loss, grads = ref_loss_and_grads(net, params, batch)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    eps = ref_epsilon(grads, rho)
    shifted = {n: p + eps[n] if n in eps else p for n, p in params.items()}
    ploss, pgrads = ref_loss_and_grads(net, shifted, batch)
    return loss, ploss, norm, pgrads


def ref_train(
    net: nn.Module,
    batches: list,
    lrs: list[float],
    rho: float,
    momentum: float = 0.0,
    interval: int = 1,
    accumulate: int = 1,
    skip: Optional[set] = None,
    return_buffers: bool = False,
    sam_on: Optional[Callable[[int], bool]] = None,
):
    """SGD(momentum) with SAM by hand, as torch.optim.SGD does it: buf = m·buf + g (buf = g the first time).

    ``lrs[k]`` is the LR of optimizer step k; SAM on steps with k % interval == 0 (or where ``sam_on(k)``);
    ``accumulate`` micro-batches per step, each with its own ε and loss / accumulate; batch indices in ``skip``
    contribute nothing. Returns the final parameters by name (and the momentum buffers with ``return_buffers``).
    """
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    bufs: dict[str, Tensor] = {}
    skip = skip or set()
    windows = [list(range(i, min(i + accumulate, len(batches)))) for i in range(0, len(batches), accumulate)]
    for k, window in enumerate(windows):
        total: dict[str, Tensor] = {}
        for i in window:
            if i in skip:
                continue
            if sam_on(k) if sam_on is not None else k % interval == 0:
                _, _, _, g = ref_sam_step(net, params, batches[i], rho)
            else:
                _, g = ref_loss_and_grads(net, params, batches[i])
            for n, v in g.items():
                total[n] = total.get(n, 0) + v / accumulate
        for n, g in total.items():
            if momentum:
                bufs[n] = g.clone() if n not in bufs else momentum * bufs[n] + g
                g = bufs[n]
            params[n] = params[n] - lrs[k] * g
    return (params, bufs) if return_buffers else params
