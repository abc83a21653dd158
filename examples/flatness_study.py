"""The paper's flatness figures at CPU scale, on Fashion-MNIST: Hessian spectrum over training, m-sharpness, landscape.

Foret et al. (2020) show (i) that SAM ends training with a much smaller top Hessian eigenvalue than SGD, its spectrum
staying low while SGD's grows (their Figure 3, right), and (ii) that a smaller m (examples per ε, "m-sharpness")
gives a lower test error (their Figure 3, middle). This script measures both on Fashion-MNIST with the same network,
data and budget for SGD and SAM, plus a 1-D loss landscape and the linear path between the two solutions.

Stages (each appends one JSON line per run to its file in ``--results``; runs already there are skipped, so an
interrupted study resumes):

- ``rho``: SAM with ρ in ``--rho-grid`` and seed 0; ρ is then picked on the **validation** split (5-fold-free: the
  2,000 images held out of the training set by ``FashionMNISTDataModule``), never on the test set.
- ``flatness``: SGD and SAM (picked ρ), ``--seeds``; ``FlatnessMonitor`` measures the top eigenvalue, the trace and
  the sharpness on 2 held-aside training batches every few epochs, plus the spectral density (stochastic Lanczos
  quadrature) at the first and last measurement; at the end, a 1-D filter-normalized landscape and the linear path
  SGD→SAM (seed by seed). Checkpoints go to ``runs/flatness_study/`` (for ``lightning-sam-flatness``).
- ``msharpness``: SAM (picked ρ) with m in ``--m-grid`` at batch 128 on one device, ``--seeds``: test error vs m.
- ``report``: tables, plots (``docs/img/flatness_*.png``) and the "Flatness" section of ``docs/results.md``.

Usage::

    python examples/flatness_study.py all --workers 2      # rho, flatness, msharpness (about 25 CPU-minutes)
    python examples/flatness_study.py report               # tables + plots + docs/results.md, from results/ only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "flatness_study"
FLAT_FILE = "flatness.jsonl"
RHO_FILE = "flatness_rho.jsonl"
M_FILE = "msharpness.jsonl"
SETTINGS = dict(train_subset=4000, val_size=2000, width=16, lr=0.01, batch_size=128)
FLAT_EPOCHS = 15
MEASURE_EVERY = 3
M_EPOCHS = 10
M_TRAIN_SUBSET = 2000


def _loss(model, batch):
    import torch.nn.functional as F

    return F.cross_entropy(model(batch[0]), batch[1])


def train_one(run: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lightning_sam import SAM
    from lightning_sam.data import FashionMNISTDataModule
    from lightning_sam.diagnostics import loss_landscape
    from lightning_sam.diagnostics.callback import FlatnessMonitor
    from lightning_sam.models import ImageClassifier, SmallCNN

    torch.set_num_threads(1)
    pl.seed_everything(run["seed"], verbose=False)
    data = FashionMNISTDataModule(
        batch_size=run["batch_size"], val_size=run["val_size"], train_subset=run["train_subset"], split_seed=0
    )
    epochs = run["epochs"]
    module = ImageClassifier(
        SmallCNN(width=run["width"]),
        optimizer=lambda params: torch.optim.SGD(params, lr=run["lr"], momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
    )
    callbacks: list[Any] = []
    if run["method"] == "sam":
        callbacks.append(SAM(rho=run["rho"], m=run.get("m")))
    monitor = None
    if run["stage"] == "flatness":
        # Sharpness at the chosen rho for both methods (SGD has no SAM callback, so rho is passed explicitly).
        monitor = FlatnessMonitor(
            every_n_epochs=MEASURE_EVERY,
            num_batches=2,
            max_iter=20,
            tol=1e-3,
            trace_probes=20,
            rho=run["measure_rho"],
            measure_at_start=True,
        )
        spectra = _spectra_callback()(monitor, mid_epoch=epochs // 2 - 1)
        callbacks += [monitor, spectra]
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    val_acc = float(trainer.callback_metrics["val/acc"])
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    row = {**run, "test_error": 1.0 - test["test/acc"], "val_error": 1.0 - val_acc, "train_seconds": seconds}
    if monitor is not None:
        row["history"] = [{k: v for k, v in h.items() if k != "spectrum"} for h in monitor.history]
        row["spectrum"] = spectra.spectra
        net, batches = module.model, monitor.batches
        land = loss_landscape(net, _loss, batches, dims=1, steps=25, span=(-1.0, 1.0), seed=0)
        row["landscape"] = {"alphas": land.alphas.tolist(), "losses": land.losses.tolist()}
        RUNS.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(RUNS / f"{run['method']}_seed{run['seed']}.ckpt")
    return row


def _spectra_callback():
    import lightning.pytorch as pl

    from lightning_sam.diagnostics import hessian_spectrum

    class Spectra(pl.Callback):
        """The spectral density (25 Lanczos steps, 1 probe) at the start, mid-way and the end of training, on the
        monitor's held-aside batches."""

        def __init__(self, monitor: Any, mid_epoch: int) -> None:
            self.monitor, self.mid_epoch, self.spectra = monitor, mid_epoch, {}

        def _take(self, label: str, module: Any) -> None:
            s = hessian_spectrum(module.model, _loss, self.monitor.batches, num_steps=25, num_probes=1, seed=0)
            self.spectra[label] = {"nodes": s.nodes.tolist(), "weights": s.weights.tolist()}

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._take("start", pl_module)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == self.mid_epoch:
                self._take("mid", pl_module)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._take("end", pl_module)

    return Spectra


def _key(run: dict[str, Any]) -> tuple:
    return tuple(run.get(k) for k in ("stage", "method", "seed", "rho", "m", "epochs", "train_subset", "width", "lr"))


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run_all(runs: list[dict[str, Any]], path: Path, workers: int) -> None:
    done = {_key(r) for r in _read(path)}
    todo = [r for r in runs if _key(r) not in done]
    print(f"{path.name}: {len(runs) - len(todo)} runs done, {len(todo)} to go", flush=True)
    if not todo:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(train_one, todo):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{row['stage']} {row['method']} rho={row.get('rho')} m={row.get('m')} seed={row['seed']}:"
                f" val {row['val_error']:.4f} test {row['test_error']:.4f} ({row['train_seconds']:.0f}s)",
                flush=True,
            )


def picked_rho(results: Path, grid: list[float]) -> float:
    rows = [r for r in _read(results / RHO_FILE) if r["rho"] in grid]
    if not rows:
        raise SystemExit(f"no rho-selection runs in {results / RHO_FILE}: run the `rho` stage first")
    best = min(rows, key=lambda r: (r["val_error"], r["rho"]))
    return best["rho"]


def stage_rho(args: argparse.Namespace) -> None:
    runs = [
        dict(stage="rho", method="sam", seed=0, rho=rho, m=None, epochs=FLAT_EPOCHS, **SETTINGS)
        for rho in args.rho_grid
    ]
    _run_all(runs, args.results / RHO_FILE, args.workers)


def stage_flatness(args: argparse.Namespace) -> None:
    rho = picked_rho(args.results, args.rho_grid)
    runs = [
        dict(
            stage="flatness",
            method=method,
            seed=seed,
            rho=rho if method == "sam" else None,
            m=None,
            epochs=FLAT_EPOCHS,
            measure_rho=rho,
            **SETTINGS,
        )
        for seed in args.seeds
        for method in ("sgd", "sam")
    ]
    _run_all(runs, args.results / FLAT_FILE, args.workers)


def stage_msharpness(args: argparse.Namespace) -> None:
    rho = picked_rho(args.results, args.rho_grid)
    settings = {**SETTINGS, "train_subset": M_TRAIN_SUBSET}
    runs = [
        dict(stage="msharpness", method="sam", seed=seed, rho=rho, m=m, epochs=M_EPOCHS, **settings)
        for seed in args.seeds
        for m in args.m_grid
    ]
    _run_all(runs, args.results / M_FILE, args.workers)


def report(args: argparse.Namespace) -> None:
    raise SystemExit("report: not written yet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["rho", "flatness", "msharpness", "all", "report"])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rho-grid", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--m-grid", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.stage in ("rho", "all"):
        stage_rho(args)
    if args.stage in ("flatness", "all"):
        stage_flatness(args)
    if args.stage in ("msharpness", "all"):
        stage_msharpness(args)
    if args.stage == "report":
        report(args)


if __name__ == "__main__":
    main()
