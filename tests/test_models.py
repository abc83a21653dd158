"""Tests of lightning_sam.models: the networks' shapes and sizes, and ImageClassifier with the Trainer and the CLI."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_sam.data import FashionMNISTDataModule
from lightning_sam.models import ImageClassifier, ResNet18, SmallCNN, WideResNet, default_optimizer, infer_num_classes


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trainer(**kwargs) -> Trainer:
    options = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return Trainer(**(options | kwargs))


# ---------------------------------------------------------------------------------------------------------- networks
def test_small_cnn_shapes():
    assert SmallCNN()(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert SmallCNN(num_classes=100, in_channels=3, width=8)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert SmallCNN().num_classes == 10
    assert 50_000 < _n_params(SmallCNN()) < 150_000  # small enough for a CPU
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        SmallCNN(width=0)


def test_resnet18_shapes_and_size():
    model = ResNet18(num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert _n_params(model) == 11_173_962  # the CIFAR ResNet-18
    assert ResNet18(num_classes=100, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    stem = model.stem[0]
    assert isinstance(stem, nn.Conv2d) and stem.stride == (1, 1) and stem.kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        ResNet18(num_classes=0)


def test_wide_resnet_28_10_has_36_5m_parameters():
    model = WideResNet(depth=28, widen_factor=10, num_classes=10)  # built, not run: a forward pass is slow on CPU
    assert _n_params(model) == 36_479_194
    assert len(model.groups) == 3 and all(len(group) == 4 for group in model.groups)  # (28 - 4) / 6 blocks per group
    assert model.fc.in_features == 640


def test_wide_resnet_forward_and_validation():
    model = WideResNet(depth=16, widen_factor=2, num_classes=100, dropout=0.3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    # Pre-activation: each block starts with BatchNorm; the network ends with BN-ReLU before pooling.
    assert isinstance(model.groups[0][0].bn1, nn.BatchNorm2d) and isinstance(model.bn, nn.BatchNorm2d)
    assert isinstance(model.groups[0][0].dropout, nn.Dropout)
    with pytest.raises(ValueError, match=r"\(depth - 4\) % 6 == 0 .*got 27"):
        WideResNet(depth=27)
    with pytest.raises(ValueError, match=r"got 4"):
        WideResNet(depth=4)
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 1.0"):
        WideResNet(depth=16, dropout=1.0)
    with pytest.raises(ValueError, match="widen_factor must be an int >= 1"):
        WideResNet(widen_factor=0)


# ---------------------------------------------------------------------------------------------------------- classifier
def test_classifier_defaults_to_the_papers_sgd():
    module = ImageClassifier(model=SmallCNN())
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 5e-4, False)
    assert module.hparams["optimizer"] is default_optimizer and "model" not in module.hparams
    assert module.num_classes == 10


def test_classifier_scheduler_config():
    module = ImageClassifier(
        SmallCNN(width=4),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=7),
        scheduler_interval="step",
    )
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].param_groups[0]["lr"] == 0.05
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config["lr_scheduler"]["scheduler"].T_max == 7 and config["lr_scheduler"]["interval"] == "step"
    plateau = ImageClassifier(SmallCNN(width=4), lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau.configure_optimizers()["lr_scheduler"]["monitor"] == "val/loss"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheduler_interval="batch"), r"scheduler_interval must be one of \('epoch', 'step'\), got 'batch'"),
        (dict(label_smoothing=1.0), r"label_smoothing must be a float in \[0, 1\), got 1.0"),
        (dict(optimizer=0.1), "optimizer must be a callable"),
        (dict(lr_scheduler="cosine"), "lr_scheduler must be None or a callable"),
        (dict(num_classes=1), "num_classes must be an int >= 2"),
        (dict(num_classes=5), "num_classes=5 but the model has num_classes=10"),
    ],
)
def test_classifier_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageClassifier(SmallCNN(width=4), **kwargs)


def test_classifier_num_classes_inference():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 7))  # no num_classes attribute: the last Linear decides
    assert infer_num_classes(plain) == 7 and ImageClassifier(plain).num_classes == 7
    assert ImageClassifier(plain, num_classes=7).train_acc.num_classes == 7
    with pytest.raises(ValueError, match="cannot tell the number of classes of Conv2d"):
        ImageClassifier(nn.Conv2d(1, 3, 3))
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        ImageClassifier("SmallCNN")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps called without a Trainer
def test_classifier_steps():
    module = ImageClassifier(SmallCNN(width=4), label_smoothing=0.1)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    loss = module.training_step((x, y), 0)
    assert loss.ndim == 0 and loss.requires_grad
    with torch.no_grad():
        expected = nn.functional.cross_entropy(module(x), y, label_smoothing=0.1)
    assert torch.allclose(loss, expected)
    module.eval()
    prediction = module.predict_step((x, y), 0)
    assert prediction.shape == (6,) and torch.equal(prediction, module(x).argmax(1))
    assert torch.equal(module.predict_step(x, 0), prediction)  # a batch without labels


def test_classifier_trains_with_the_trainer_and_reloads(tmp_path):
    seed_everything(0, verbose=False)
    datamodule = FashionMNISTDataModule(batch_size=64, train_subset=512, val_size=512)
    module = ImageClassifier(SmallCNN(width=8), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    trainer = _trainer(max_epochs=2)
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    # 16 steps on 512 images: well above chance (0.1), although BatchNorm's running statistics are still young.
    assert float(metrics["val/loss"]) < before["val/loss"] and float(metrics["val/acc"]) > 0.3
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    assert set(test) == {"test/loss", "test/acc"} and test["test/acc"] > 0.3
    predictions = torch.cat(trainer.predict(module, datamodule=datamodule))
    assert predictions.shape == (10000,) and int(predictions.max()) < 10
    # A checkpoint keeps the hyperparameters (the optimizer callable included); the network comes back by argument.
    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path, model=SmallCNN(width=8), weights_only=False)
    assert restored.hparams["optimizer"].keywords == {"lr": 0.05, "momentum": 0.9}
    assert torch.equal(restored.model.classifier.weight, module.model.classifier.weight)


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # the empty val loader, on purpose
def test_classifier_without_validation_set():
    datamodule = FashionMNISTDataModule(batch_size=64, train_subset=128, val_size=0)
    trainer = _trainer(max_epochs=1)
    trainer.fit(ImageClassifier(SmallCNN(width=4)), datamodule=datamodule)
    assert trainer.global_step == 2 and "val/acc" not in trainer.callback_metrics


def test_classifier_with_the_sam_callback():
    from lightning_sam import SAM

    seed_everything(0, verbose=False)
    datamodule = FashionMNISTDataModule(batch_size=64, train_subset=256, val_size=256)
    trainer = _trainer(max_epochs=1, callbacks=[SAM(rho=0.05)])
    trainer.fit(ImageClassifier(SmallCNN(width=4), optimizer=partial(torch.optim.SGD, lr=0.05)), datamodule=datamodule)
    assert trainer.global_step == 4
    assert {"train/loss", "val/acc", "sam/sharpness"} <= set(trainer.callback_metrics)


def test_lightning_cli_parses_nested_class_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-sam"])  # pytest's own arguments are not for the CLI
    config = tmp_path / "config.yaml"
    config.write_text(
        """
model:
  class_path: lightning_sam.models.ImageClassifier
  init_args:
    model:
      class_path: lightning_sam.models.SmallCNN
      init_args: {width: 8}
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.03, momentum: 0.9}
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.CosineAnnealingLR
      init_args: {T_max: 5}
    label_smoothing: 0.1
data:
  class_path: lightning_sam.data.FashionMNISTDataModule
  init_args: {batch_size: 64, train_subset: 256, label_noise: 0.2}
trainer:
  max_epochs: 1
  logger: false
"""
    )
    cli = LightningCLI(run=False, args=["--config", str(config)], save_config_callback=None)
    module = cli.model
    assert isinstance(module, ImageClassifier) and isinstance(module.model, SmallCNN)
    assert module.model.classifier.in_features == 16 * 7 * 7 and module.label_smoothing == 0.1
    config_out = module.configure_optimizers()
    group = config_out["optimizer"].param_groups[0]
    assert isinstance(config_out["optimizer"], torch.optim.SGD) and (group["lr"], group["momentum"]) == (0.03, 0.9)
    assert config_out["lr_scheduler"]["scheduler"].T_max == 5 and config_out["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(cli.datamodule, FashionMNISTDataModule) and cli.datamodule.label_noise == 0.2
    # The hyperparameters are the config (serializable); the dumped config round-trips through the parser.
    assert module.hparams["optimizer"]["class_path"] == "torch.optim.SGD"
    dumped = cli.parser.dump(cli.config)
    assert "class_path: lightning_sam.models.SmallCNN" in dumped

    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(
        "model:\n  class_path: lightning_sam.models.ImageClassifier\n"
        "  init_args:\n    model:\n      class_path: lightning_sam.models.SmallCNN\n"
    )
    cli = LightningCLI(run=False, args=["--config", str(defaults)], save_config_callback=None)
    assert cli.model.configure_optimizers().param_groups[0]["weight_decay"] == 5e-4
    assert "optimizer: lightning_sam.models.default_optimizer" in cli.parser.dump(cli.config)
