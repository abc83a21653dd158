"""lightning-sam-flatness on two tiny checkpoints of a LightningCLI config, on real Fashion-MNIST batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_sam.data.fashion_mnist import SYSTEM_DIR
from lightning_sam.diagnostics import hessian_eigenvalues, sharpness
from lightning_sam.diagnostics.callback import cross_entropy_loss
from lightning_sam.diagnostics.cli import build_from_config, load_batches, main

needs_data = pytest.mark.skipif(not (SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="no Fashion-MNIST")

CONFIG = """\
seed_everything: 0
trainer:
  max_epochs: 1
model:
  class_path: lightning_sam.models.ImageClassifier
  init_args:
    model:
      class_path: lightning_sam.models.SmallCNN
      init_args:
        width: 2
data:
  class_path: lightning_sam.data.FashionMNISTDataModule
  init_args:
    batch_size: 16
    val_size: 100
    train_subset: 64
ckpt_path: null
"""


@needs_data
def test_the_command_measures_two_checkpoints_and_writes_json_and_png(tmp_path: Path, capsys):
    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(CONFIG)  # where LightningCLI saves it
    paths = []
    for name, scale in (("sgd", 1.0), ("sam", 0.5)):
        module, _ = build_from_config(run / "config.yaml")
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(scale)
        paths.append(run / "checkpoints" / f"{name}.ckpt")
        torch.save({"state_dict": module.state_dict()}, paths[-1])
    out = tmp_path / "out"
    results = main([str(p) for p in paths] + ["--labels", "SGD", "SAM", "--trace-probes", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "top eigenvalue ratio SAM/SGD" in printed
    saved = json.loads((out / "flatness.json").read_text())
    assert saved == json.loads(json.dumps(results)) and set(saved["checkpoints"]) == {"SGD", "SAM"}
    assert (out / "flatness_landscape.png").stat().st_size > 1000
    # The numbers are the library's, on the same batches.
    module, datamodule = build_from_config(run / "config.yaml")
    module.load_state_dict(torch.load(paths[1], weights_only=False)["state_dict"])
    batches = load_batches(datamodule, 2, 0)
    sam = saved["checkpoints"]["SAM"]
    assert sam["top_eigenvalue"] == pytest.approx(float(hessian_eigenvalues(module, cross_entropy_loss, batches)[0]))
    assert sam["sharpness"] == pytest.approx(sharpness(module.eval(), cross_entropy_loss, batches, rho=0.05))
    path = saved["linear_path"]
    index = path["ts"].index(1.0) if 1.0 in path["ts"] else None
    mid = len(sam["landscape"]["losses"]) // 2
    assert sam["landscape"]["alphas"][mid] == 0.0 and sam["landscape"]["losses"][mid] == pytest.approx(sam["loss"])
    if index is not None:
        assert path["losses"][index] == pytest.approx(sam["loss"], rel=1e-5)


def test_a_missing_config_is_a_clear_error(tmp_path: Path, capsys):
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(SystemExit):
        main([str(ckpt)])
    assert "pass --config" in capsys.readouterr().err
