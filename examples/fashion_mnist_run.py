"""One CPU-sized Fashion-MNIST training run, as every study here makes it: the shared part of
``label_noise_study.py``, ``efficient_sam_study.py`` and ``flatness_study.py``.

SmallCNN, SGD with momentum 0.9 and weight decay 5e-4, a cosine LR over the run's epochs, Debian's Fashion-MNIST
read offline; the run's seed fixes the initial weights, the data order and the label noise.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional


def fit_and_test(
    run: dict[str, Any],
    callbacks: Optional[list[Any]] = None,
    module_cls: Optional[type] = None,
    test: bool = True,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train as ``run`` says (``seed``, ``epochs``, ``train_subset``, ``width``, ``lr``; optional ``noise``,
    ``threads``, ``batch_size``, ``val_size``), then test once.

    Returns the module, the trainer, the data module, ``train_seconds`` (wall clock), ``train_cpu_seconds`` (this
    process's CPU time), ``val_acc`` and, with ``test``, the test metrics.
    """
    import lightning.pytorch as pl
    import torch

    from lightning_sam.data import FashionMNISTDataModule
    from lightning_sam.models import ImageClassifier, SmallCNN

    torch.set_num_threads(run.get("threads", 1))
    pl.seed_everything(run["seed"], verbose=False)
    noise = run.get("noise", 0.0)
    data = FashionMNISTDataModule(
        batch_size=run.get("batch_size", 128),
        val_size=run.get("val_size", 5000),
        train_subset=run["train_subset"],
        label_noise=noise,
        noise_seed=run["seed"],
        split_seed=0,
    )
    epochs = run["epochs"]
    module = (module_cls or ImageClassifier)(
        SmallCNN(width=run["width"]),
        optimizer=lambda params: torch.optim.SGD(params, lr=run["lr"], momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    result = {
        "module": module,
        "trainer": trainer,
        "data": data,
        "train_seconds": time.perf_counter() - start,
        "train_cpu_seconds": time.process_time() - cpu_start,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "train_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if test:
        result["test"] = trainer.test(module, datamodule=data, verbose=False)[0]
    return result


def run_all(
    train_one: Callable[[dict[str, Any]], dict[str, Any]],
    runs: list[dict[str, Any]],
    out: str,
    workers: int,
    describe: Callable[[dict[str, Any]], str],
) -> None:
    """Train ``runs`` in ``workers`` processes (one CPU thread each, a fresh process per run), appending each finished
    row to the JSON-lines file ``out`` as it comes: an interrupted study loses at most the runs in flight."""
    import json
    import multiprocessing as mp
    import os

    if not runs:
        return
    os.makedirs(os.path.dirname(str(out)) or ".", exist_ok=True)
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(train_one, runs):
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(describe(row), flush=True)
