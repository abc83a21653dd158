"""``ImageClassifier``: a plain LightningModule around any image classification network."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

_INTERVALS = ("epoch", "step")


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """SGD with learning rate 0.1, momentum 0.9 and weight decay 5e-4 (no Nesterov): the SAM paper's CIFAR setting.

    A module-level function rather than a lambda, so that it pickles (checkpoints keep it in the hyperparameters)
    and jsonargparse can print it as an import path.

    Example:

        optimizer = default_optimizer(model.parameters())
    """
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)


def infer_num_classes(model: nn.Module) -> Optional[int]:
    """``model.num_classes`` if the model has one, else the ``out_features`` of its last ``nn.Linear``, else None."""
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1].out_features if linears else None


class ImageClassifier(LightningModule):
    """Train ``model`` with cross-entropy; log loss and accuracy for training, validation and test.

    A module written for automatic optimization: to train it with SAM, add the callback
    (``Trainer(callbacks=[lightning_sam.SAM(rho=0.05)])``), the module stays as it is.

    Logged: ``train/loss`` (per step, progress bar), ``train/acc`` (per step and per epoch), ``val/loss``,
    ``val/acc`` (progress bar), ``test/loss`` and ``test/acc`` (per epoch). Accuracy is top-1 over all examples
    (micro average). Validation and test losses are plain cross-entropy, without label smoothing, so that they
    compare across settings. ``predict_step`` returns the predicted class of each example.

    Args:
        model: The network: images to logits of shape ``(B, num_classes)``.
        optimizer: A callable from parameters to an optimizer; in a LightningCLI config, a ``class_path`` with
            ``init_args`` (e.g. ``torch.optim.SGD`` with ``lr``). Default: ``default_optimizer``.
        lr_scheduler: A callable from the optimizer to a learning-rate scheduler (e.g. ``CosineAnnealingLR`` with
            ``T_max`` in the config), or None. A ``ReduceLROnPlateau`` monitors ``val/loss``.
        scheduler_interval: Step the scheduler every ``"epoch"`` or every ``"step"`` (optimizer step).
        label_smoothing: Label smoothing of the training loss, in ``[0, 1)``.
        num_classes: Number of classes, for the accuracy metrics. None: ``model.num_classes``, else the
            ``out_features`` of the model's last ``nn.Linear``.

    Example:

        from functools import partial
        from lightning.pytorch import Trainer
        from lightning_sam import SAM
        from lightning_sam.data import FashionMNISTDataModule
        from lightning_sam.models import ImageClassifier, SmallCNN

        module = ImageClassifier(SmallCNN(), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
        Trainer(max_epochs=2, callbacks=[SAM(rho=0.05)]).fit(module, datamodule=FashionMNISTDataModule())

    In a LightningCLI YAML config:

        model:
          class_path: lightning_sam.models.ImageClassifier
          init_args:
            model:
              class_path: lightning_sam.models.SmallCNN
            optimizer:
              class_path: torch.optim.SGD
              init_args: {lr: 0.05, momentum: 0.9}
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(optimizer):
            raise ValueError(f"optimizer must be a callable from parameters to an optimizer, got {optimizer!r}")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise ValueError(f"lr_scheduler must be None or a callable from the optimizer, got {lr_scheduler!r}")
        if scheduler_interval not in _INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {_INTERVALS}, got {scheduler_interval!r}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
        inferred = infer_num_classes(model)
        if num_classes is None:
            if inferred is None:
                raise ValueError(
                    f"cannot tell the number of classes of {type(model).__name__} (no `num_classes` attribute and no"
                    " nn.Linear): pass num_classes"
                )
            num_classes = inferred
        elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        elif getattr(model, "num_classes", num_classes) != num_classes:
            raise ValueError(f"num_classes={num_classes} but the model has num_classes={model.num_classes}")
        # The model is a module: checkpoints keep it in the state dict, not in the hyperparameters.
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.label_smoothing = float(label_smoothing)
        # One metric per stage: each keeps its own running state.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=stage == "val")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch  # with or without labels
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
