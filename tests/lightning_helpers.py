"""Small Lightning modules and data shared by the Lightning-level tests."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader


def linreg_batches(n_batches: int = 4, batch: int = 8, dim: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, dim, generator=gen), torch.randn(batch, generator=gen)) for _ in range(n_batches)]


def loader(batches) -> DataLoader:
    """One pre-made batch per step, in order."""
    return DataLoader(batches, batch_size=None, shuffle=False)


def initial_weights(dim: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, dim, generator=gen), torch.randn(1, generator=gen)


class LinReg(pl.LightningModule):
    """Linear regression, MSE, plain SGD: written for automatic optimization, as a user would."""

    def __init__(
        self,
        w: torch.Tensor,
        b: torch.Tensor,
        lr: float = 0.1,
        rho_bias: Optional[float] = None,
        optimizer: str = "sgd",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lin = torch.nn.Linear(w.shape[1], 1)
        with torch.no_grad():
            self.lin.weight.copy_(w)
            self.lin.bias.copy_(b)
        self.lr, self.rho_bias, self.optimizer_kind = lr, rho_bias, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.lin(x).squeeze(-1) - y) ** 2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        groups = [{"params": [self.lin.weight]}, {"params": [self.lin.bias]}]
        if self.rho_bias is not None:
            groups[1]["rho"] = self.rho_bias
        if self.optimizer_kind == "sam":
            from lightning_sam import SAMOptimizer

            return SAMOptimizer(groups, torch.optim.SGD, rho=0.05, lr=self.lr)
        return torch.optim.SGD(groups, lr=self.lr)


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
