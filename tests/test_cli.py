"""The `lightning-sam` command: example configs, argument checks before training, a short run on real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_sam import SAM
from lightning_sam.cli import SAMLightningCLI, main
from lightning_sam.data import find_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def _has_fashion_mnist() -> bool:
    try:
        find_fashion_mnist(None)
        return True
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(
    not _has_fashion_mnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_there_are_example_configs():
    names = {c.name for c in CONFIGS}
    assert {"fashion_mnist_sam.yaml", "fashion_mnist_sgd.yaml", "cifar10_wrn28_10_sam.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_print_config_round_trips(config, capsys, tmp_path):
    printed = _print_config(["fit", "--config", str(config)], capsys)
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert _print_config(["fit", "--config", str(again)], capsys) == printed
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    sam_callbacks = [c for c in printed["trainer"].get("callbacks") or [] if c["class_path"] == "lightning_sam.SAM"]
    if "sam" in config.stem and "optimizer" not in config.stem:
        assert sam_callbacks and sam_callbacks[0]["init_args"]["rho"] > 0


def _fit_args(config: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "examples" / "configs" / config),
        "--trainer.max_steps=6",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.train_subset=768",
        *extra,
    ]


def _cli(args: list[str]) -> SAMLightningCLI:
    return SAMLightningCLI(
        subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args
    )


@needs_data
def test_fit_validate_test_predict_on_real_fashion_mnist(tmp_path):
    cli = _cli(_fit_args("fashion_mnist_sam.yaml", tmp_path))
    trainer = cli.trainer
    sam = next(cb for cb in trainer.callbacks if isinstance(cb, SAM))
    assert trainer.global_step == 6 and sam.counters.sam_steps == 6
    fit_val_acc = float(trainer.callback_metrics["val/acc"])
    assert 0.1 < fit_val_acc <= 1.0  # 6 SAM steps on real data already beat chance
    assert "sam/sharpness" in trainer.logged_metrics
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "no checkpoint written"
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard log"
    last = next(c for c in checkpoints if c.name == "last.ckpt")
    ckpt = torch.load(last, weights_only=False)
    assert any("SAM" in key for key in ckpt["callbacks"])

    def run(subcommand: str, *extra: str) -> SAMLightningCLI:
        config = str(ROOT / "examples/configs/fashion_mnist_sam.yaml")
        common = ["--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"]
        return _cli([subcommand, "--config", config, *common, *extra, "--ckpt_path", str(last)])

    # The same weights on the same two validation batches: the fit's last validation accuracy, exactly.
    validated = run("validate", "--trainer.limit_val_batches=2")
    assert float(validated.trainer.callback_metrics["val/acc"]) == pytest.approx(fit_val_acc, abs=1e-6)
    tested = run("test", "--trainer.limit_test_batches=2")
    assert 0.1 < float(tested.trainer.callback_metrics["test/acc"]) <= 1.0
    predicted = run("predict", "--trainer.limit_predict_batches=2")
    classes = torch.cat(predicted.trainer.predict_loop.predictions)
    assert classes.shape == (256,) and classes.min() >= 0 and classes.max() < 10


@needs_data
def test_sam_optimizer_config_gets_the_sam_step(tmp_path):
    cli = _cli(_fit_args("fashion_mnist_sam_optimizer.yaml", tmp_path))
    sams = [cb for cb in cli.trainer.callbacks if isinstance(cb, SAM)]
    assert len(sams) == 1 and sams[0].counters.sam_steps == 6
    from lightning_sam import SAMOptimizer

    assert isinstance(cli.trainer.optimizers[0], SAMOptimizer)
    assert cli.trainer.optimizers[0].param_groups[0]["rho"] == 0.05


@needs_data
@pytest.mark.parametrize(
    "config, cls", [("fashion_mnist_looksam.yaml", "LookSAM"), ("fashion_mnist_gsam.yaml", "GSAM")]
)
def test_variant_from_yaml_trains(tmp_path, config, cls):
    cli = _cli(_fit_args(config, tmp_path))
    (sam,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SAM)]
    assert type(sam.variant).__name__ == cls
    if cls == "LookSAM":
        assert (sam.variant.k, sam.variant.alpha) == (5, 0.7)
        assert (sam.counters.sam_steps, sam.counters.plain_steps) == (2, 4)  # steps 0 and 5 of 6
    else:
        assert sam.config.same_randomness and sam.variant.alpha == 0.1
        assert sam.counters.sam_steps == 6


def _bad(tmp_path: Path, capsys, *extra: str) -> str:
    """Run fit with a bad setting; return everything it said. It must stop before any training step."""
    with pytest.raises((SystemExit, Exception)) as info:
        main(_fit_args("fashion_mnist_sam.yaml", tmp_path, *extra))
    captured = capsys.readouterr()
    assert not list(tmp_path.rglob("*.ckpt"))
    return f"{info.value}\n{captured.err}\n{captured.out}"


def test_bad_rho_is_refused_before_training(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    source = yaml.safe_load((ROOT / "examples/configs/fashion_mnist_sam.yaml").read_text())
    source["trainer"]["callbacks"][0]["init_args"]["rho"] = -0.1
    config.write_text(yaml.safe_dump(source))
    message = _bad(tmp_path, capsys, "--config", str(config))
    assert "rho" in message and "> 0" in message


def test_unknown_base_optimizer_is_refused(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    source = yaml.safe_load((ROOT / "examples/configs/fashion_mnist_sam_optimizer.yaml").read_text())
    source["model"]["init_args"]["optimizer"]["init_args"]["base_optimizer"]["class_path"] = (
        "torch.optim.NoSuchOptimizer"
    )
    config.write_text(yaml.safe_dump(source))
    message = _bad(tmp_path, capsys, "--config", str(config))
    assert "NoSuchOptimizer" in message


def test_value_clipping_is_refused(tmp_path, capsys):
    message = _bad(tmp_path, capsys, "--trainer.gradient_clip_val=1.0", "--trainer.gradient_clip_algorithm=value")
    assert "direction" in message


def test_python_dash_m_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "lightning_sam", "--help"], capture_output=True, text=True, check=True)
    assert all(sub in out.stdout for sub in ("fit", "validate", "test", "predict"))
