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

    python examples/flatness_study.py all --workers 2      # rho, flatness, paths, msharpness (~35 run-minutes)
    python examples/flatness_study.py report               # tables + plots + docs/results.md, from results/ only
"""

from __future__ import annotations

import argparse
import json
import statistics
import math
from pathlib import Path
from typing import Any

from fashion_mnist_run import run_all

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
    from fashion_mnist_run import fit_and_test

    from lightning_sam import SAM
    from lightning_sam.diagnostics import loss_landscape
    from lightning_sam.diagnostics.callback import FlatnessMonitor

    epochs = run["epochs"]
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
    result = fit_and_test(run, callbacks=callbacks)
    module, trainer, test = result["module"], result["trainer"], result["test"]
    seconds, val_acc = result["train_seconds"], result["val_acc"]
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
    run_all(
        train_one,
        todo,
        str(path),
        workers,
        lambda row: (
            f"{row['stage']} {row['method']} rho={row.get('rho')} m={row.get('m')} seed={row['seed']}:"
            f" val {row['val_error']:.4f} test {row['test_error']:.4f} ({row['train_seconds']:.0f}s)"
        ),
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
    # --rho: a sensitivity run at another rho than the one picked on validation (reported apart).
    rho = args.rho if args.rho is not None else picked_rho(args.results, args.rho_grid)
    settings = {**SETTINGS, "train_subset": M_TRAIN_SUBSET}
    runs = [
        dict(stage="msharpness", method="sam", seed=seed, rho=rho, m=m, epochs=M_EPOCHS, **settings)
        for seed in args.seeds
        for m in args.m_grid
    ]
    _run_all(runs, args.results / M_FILE, args.workers)


PATH_FILE = "flatness_paths.jsonl"
MARK_START = "<!-- flatness-study:start (generated by examples/flatness_study.py report) -->"
MARK_END = "<!-- flatness-study:end -->"


CONFIG = f"""\
# The model and data of the flatness runs, for `lightning-sam-flatness` (written by examples/flatness_study.py).
model:
  class_path: lightning_sam.models.ImageClassifier
  init_args:
    model:
      class_path: lightning_sam.models.SmallCNN
      init_args:
        width: {SETTINGS["width"]}
data:
  class_path: lightning_sam.data.FashionMNISTDataModule
  init_args:
    batch_size: {SETTINGS["batch_size"]}
    val_size: {SETTINGS["val_size"]}
    train_subset: {SETTINGS["train_subset"]}
"""


def stage_paths(args: argparse.Namespace) -> None:
    """The loss on the straight line SGD -> SAM for each seed, from the flatness runs' checkpoints."""
    import torch

    from lightning_sam.data import FashionMNISTDataModule
    from lightning_sam.diagnostics import linear_path
    from lightning_sam.models import ImageClassifier, SmallCNN

    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "config.yaml").write_text(CONFIG)  # for `lightning-sam-flatness runs/flatness_study/*.ckpt`
    path = args.results / PATH_FILE
    done = {r["seed"] for r in _read(path)}
    for seed in args.seeds:
        ckpts = [RUNS / f"{method}_seed{seed}.ckpt" for method in ("sgd", "sam")]
        if seed in done or not all(c.exists() for c in ckpts):
            continue
        models = []
        for ckpt in ckpts:
            module = ImageClassifier(SmallCNN(width=SETTINGS["width"]))
            module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
            models.append(module.model.eval())
        data = FashionMNISTDataModule(
            batch_size=SETTINGS["batch_size"], val_size=SETTINGS["val_size"], train_subset=SETTINGS["train_subset"]
        )
        data.setup("fit")
        data.setup("test")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            train = [b for _, b in zip(range(2), data.train_dataloader())]
        x, y = data.test_dataset.images[:1000], data.test_dataset.targets[:1000]
        rows = {"seed": seed}
        for name, batches in (("train", train), ("test", [(x, y)])):
            lp = linear_path(models[0], models[1], _loss, batches, steps=25, span=(-0.5, 1.5))
            rows["ts"], rows[f"{name}_losses"] = lp.ts.tolist(), lp.losses.tolist()
        with open(path, "a") as f:
            f.write(json.dumps(rows) + "\n")
        print(f"linear path seed {seed} written", flush=True)


def _ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = scale * statistics.mean(values)
    std = scale * (statistics.stdev(values) if len(values) > 1 else 0.0)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report(args: argparse.Namespace) -> None:
    import torch

    from lightning_sam.diagnostics import HessianSpectrum
    from lightning_sam.diagnostics.plotting import plot_spectrum, pyplot

    plt = pyplot()
    img = args.docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    out: list[str] = [MARK_START, "", "## Flatness: the Hessian spectrum, m-sharpness and the landscape", ""]
    out += [
        "Reproduce (resumable; one thread per run, 2 workers: the runs below took 34 run-minutes, plus 16 for the"
        " ρ = 0.05 sensitivity sweep, on a 2-core machine shared with other jobs), then regenerate this section:",
        "",
        "```bash",
        "python examples/flatness_study.py all --workers 2",
        "python examples/flatness_study.py msharpness --rho 0.05 --m-grid 4 16 128   # sensitivity",
        "python examples/flatness_study.py report",
        "```",
        "",
        f"Set-up: `SmallCNN(width={SETTINGS['width']})`, SGD (lr {SETTINGS['lr']}, momentum 0.9, weight decay 5e-4,"
        f" cosine), batch {SETTINGS['batch_size']}, trained with Lightning's `Trainer`, with the `SAM` callback or"
        f" without (SGD); the same data order and initialization per seed. Flatness runs: {SETTINGS['train_subset']:,}"
        f" training images, {FLAT_EPOCHS} epochs. Measurements by `FlatnessMonitor` on 2 held-aside training batches"
        f" (256 images, BatchNorm in eval mode) at the start and every {MEASURE_EVERY} epochs: top eigenvalue (Lanczos,"
        " tol 1e-3), trace (Hutchinson, 20 probes) and sharpness at the chosen ρ; the spectral density (stochastic"
        " Lanczos quadrature, 25 steps) at the start, mid-way and the end.",
        "",
    ]

    # rho
    rho_rows = sorted(_read(args.results / RHO_FILE), key=lambda r: r["rho"])
    rho = picked_rho(args.results, args.rho_grid)
    out += ["### ρ, chosen on the validation split", ""]
    out += ["| ρ | validation error (%) | seeds |", "|---|---|---|"]
    for r in rho_rows:
        mark = " **(picked)**" if r["rho"] == rho else ""
        out.append(f"| {r['rho']}{mark} | {100 * r['val_error']:.2f} | 1 (seed 0) |")
    out += [
        "",
        f"ρ = {rho}: the lowest validation error (2,000 images held out of the training set; the test set was not"
        " looked at). It is used for every SAM run below and for the sharpness measure of both methods.",
        "",
    ]

    # flatness
    flat = [r for r in _read(args.results / FLAT_FILE) if r["method"] == "sgd" or r["rho"] == rho]
    by = {m: sorted([r for r in flat if r["method"] == m], key=lambda r: r["seed"]) for m in ("sgd", "sam")}
    steps_per_epoch = math.ceil(SETTINGS["train_subset"] / SETTINGS["batch_size"])
    if by["sgd"] and by["sam"]:
        last = {m: [r["history"][-1] for r in by[m]] for m in by}
        out += ["### The top eigenvalue over training, SGD vs SAM", ""]
        out += [
            "| | test error (%) | final top eigenvalue | final trace | final sharpness (ρ = "
            + str(rho)
            + ") | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for m, name in (("sgd", "SGD"), ("sam", f"SAM (ρ = {rho})")):
            out.append(
                f"| {name} | {_ms([r['test_error'] for r in by[m]], 100)} |"
                f" {_ms([h['top_eigenvalue'] for h in last[m]])} | {_ms([h['trace'] for h in last[m]], digits=1)} |"
                f" {_ms([h['sharpness'] for h in last[m]], digits=4)} | {len(by[m])} |"
            )
        seeds = sorted({r["seed"] for r in by["sgd"]} & {r["seed"] for r in by["sam"]})
        pair = {m: {r["seed"]: r for r in by[m]} for m in by}
        ratios = [
            pair["sam"][s]["history"][-1]["top_eigenvalue"] / pair["sgd"][s]["history"][-1]["top_eigenvalue"]
            for s in seeds
        ]
        trace_ratios = [pair["sam"][s]["history"][-1]["trace"] / pair["sgd"][s]["history"][-1]["trace"] for s in seeds]
        out += [
            "",
            f"**Top-eigenvalue ratio SAM/SGD at the end: {_ms(ratios, digits=3)}** (per seed, paired:"
            f" {', '.join(f'{x:.3f}' for x in ratios)}); trace ratio {_ms(trace_ratios, digits=3)}.",
            "",
            "| epochs done | " + " | ".join(["SGD top eigenvalue", "SAM top eigenvalue"]) + " |",
            "|---|---|---|",
        ]
        epochs = [h["global_step"] / steps_per_epoch for h in by["sgd"][0]["history"]]
        for i, e in enumerate(epochs):
            cells = [_ms([r["history"][i]["top_eigenvalue"] for r in by[m]]) for m in ("sgd", "sam")]
            out.append(f"| {e:g} | {cells[0]} | {cells[1]} |")

        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
        for m, color, name in (("sgd", "tab:gray", "SGD"), ("sam", "tab:blue", f"SAM ρ={rho}")):
            values = torch.tensor([[h["top_eigenvalue"] for h in r["history"]] for r in by[m]])
            xs = [h["global_step"] / steps_per_epoch for h in by[m][0]["history"]]
            std = values.std(0) if len(by[m]) > 1 else torch.zeros(values.shape[1])
            axes[0].plot(xs, values.mean(0), marker="o", color=color, label=name)
            axes[0].fill_between(xs, values.mean(0) - std, values.mean(0) + std, color=color, alpha=0.2)
            sharp = torch.tensor([[h["sharpness"] for h in r["history"]] for r in by[m]])
            axes[1].plot(xs, sharp.mean(0), marker="o", color=color, label=name)
        axes[0].set(xlabel="epoch", ylabel="top Hessian eigenvalue", title="λ_max over training (mean ± std)")
        axes[1].set(xlabel="epoch", ylabel=f"sharpness at ρ={rho}", title="L(w+ε̂) − L(w) over training")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(img / "flatness_eigenvalue.png", dpi=120)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6), sharex=True, sharey=True)
        for ax, m, name in ((axes[0], "sgd", "SGD"), (axes[1], "sam", f"SAM ρ={rho}")):
            spectra = {}
            for label in ("start", "mid", "end"):
                s = pair[m][seeds[0]]["spectrum"].get(label)
                if s:
                    spectra[f"{name}, {label}"] = HessianSpectrum(
                        torch.tensor(s["nodes"], dtype=torch.float64), torch.tensor(s["weights"], dtype=torch.float64)
                    )
            plot_spectrum(spectra, ax=ax)
            ax.set_title(f"{name}: Hessian eigenvalue density (seed {seeds[0]})")
        fig.tight_layout()
        fig.savefig(img / "flatness_spectrum.png", dpi=120)
        plt.close(fig)
        out += [
            "",
            "![Top eigenvalue and sharpness over training](img/flatness_eigenvalue.png)",
            "",
            "![Eigenvalue density at the start, mid-way and end of training](img/flatness_spectrum.png)",
            "",
        ]

        # landscape
        paths = {r["seed"]: r for r in _read(args.results / PATH_FILE)}
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
        for m, color, name in (("sgd", "tab:gray", "SGD"), ("sam", "tab:blue", f"SAM ρ={rho}")):
            for i, r in enumerate(by[m]):
                axes[0].plot(
                    r["landscape"]["alphas"],
                    r["landscape"]["losses"],
                    color=color,
                    alpha=0.8,
                    label=name if i == 0 else None,
                )
        axes[0].set(
            xlabel="α along a filter-normalized random direction",
            ylabel="training loss (2 batches)",
            title="1-D landscape around each solution (all seeds)",
        )
        if paths:
            for s, r in sorted(paths.items()):
                axes[1].plot(r["ts"], r["test_losses"], label=f"test loss, seed {s}")
            axes[1].axvline(0, color="gray", ls="--", lw=0.8)
            axes[1].axvline(1, color="tab:blue", ls="--", lw=0.8)
            axes[1].set(xlabel="t: (1 − t)·w_SGD + t·w_SAM", ylabel="loss (1,000 test images)", title="SGD → SAM")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "flatness_landscape.png", dpi=120)
        plt.close(fig)
        rise = {
            m: [
                max(r["landscape"]["losses"][0], r["landscape"]["losses"][-1])
                - r["landscape"]["losses"][len(r["landscape"]["losses"]) // 2]
                for r in by[m]
            ]
            for m in by
        }
        out += [
            "### Landscape",
            "",
            f"Loss rise at α = ±1 over the loss at w (the larger side): SGD {_ms(rise['sgd'], digits=3)}, SAM"
            f" {_ms(rise['sam'], digits=3)}.",
            "",
            "![1-D landscapes of the SGD and SAM solutions, and the path between them](img/flatness_landscape.png)",
            "",
        ]

    # m-sharpness
    mrows = [r for r in _read(args.results / M_FILE) if r["rho"] == rho]
    if mrows:
        ms = sorted({r["m"] for r in mrows})
        out += ["### m-sharpness: test error against m (batch 128, one device)", ""]
        out += [
            f"SAM with ρ = {rho}, {M_TRAIN_SUBSET:,} training images, {M_EPOCHS} epochs; ε̂ from each chunk of m"
            " examples (the `SAM(m=...)` setting).",
            "",
            "| m | test error (%) | validation error (%) | seeds |",
            "|---|---|---|---|",
        ]
        means = []
        for m in ms:
            cell = [r for r in mrows if r["m"] == m]
            means.append(statistics.mean(r["test_error"] for r in cell))
            out.append(
                f"| {m} | {_ms([r['test_error'] for r in cell], 100)} | {_ms([r['val_error'] for r in cell], 100)} |"
                f" {len(cell)} |"
            )
        logm = [math.log2(m) for m in ms]
        slope = _slope(logm, [100 * v for v in means])
        per_seed = sorted({r["seed"] for r in mrows})
        slopes = []
        for s in per_seed:
            cells = {r["m"]: r["test_error"] for r in mrows if r["seed"] == s}
            if len(cells) == len(ms):
                slopes.append(_slope(logm, [100 * cells[m] for m in ms]))
        out += [
            "",
            f"Trend: least-squares slope of the mean test error against log2(m): **{slope:+.3f} points per doubling"
            f" of m** (per seed: {', '.join(f'{x:+.3f}' for x in slopes)}). A positive slope is the paper's direction"
            " (smaller m, lower error).",
            "",
            "![Test error against m](img/msharpness.png)",
            "",
        ]
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        stds = [
            100 * (statistics.stdev([r["test_error"] for r in mrows if r["m"] == m]) if len(per_seed) > 1 else 0)
            for m in ms
        ]
        ax.errorbar(ms, [100 * v for v in means], yerr=stds, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="m (examples per ε̂)", ylabel="test error (%)", title="m-sharpness (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(img / "msharpness.png", dpi=120)
        plt.close(fig)
    other = sorted({r["rho"] for r in _read(args.results / M_FILE)} - {rho})
    for extra in other:
        rows = [r for r in _read(args.results / M_FILE) if r["rho"] == extra]
        ms = sorted({r["m"] for r in rows})
        out += [
            f"Sensitivity (not picked on validation): the same sweep at ρ = {extra}, m in {ms}.",
            "",
            "| m | test error (%) | validation error (%) | seeds |",
            "|---|---|---|---|",
        ]
        for m in ms:
            cell = [r for r in rows if r["m"] == m]
            out.append(
                f"| {m} | {_ms([r['test_error'] for r in cell], 100)} | {_ms([r['val_error'] for r in cell], 100)} |"
                f" {len(cell)} |"
            )
        means = [statistics.mean(r["test_error"] for r in rows if r["m"] == m) for m in ms]
        out += [
            "",
            f"Slope against log2(m) at ρ = {extra}: {_slope([math.log2(m) for m in ms], [100 * v for v in means]):+.3f}"
            " points per doubling.",
            "",
        ]
    out += [MARK_END]
    section = "\n".join(out) + "\n"
    print(section)
    results_md = args.docs / "results.md"
    text = results_md.read_text()
    if MARK_START in text and MARK_END in text:
        before, rest = text.split(MARK_START, 1)
        after = rest.split(MARK_END, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_md.write_text(text)
    print(f"updated {results_md}")


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["rho", "flatness", "paths", "msharpness", "all", "report"])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rho-grid", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--m-grid", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--rho", type=float, default=None, help="msharpness only: this rho instead of the picked one")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    if args.stage in ("rho", "all"):
        stage_rho(args)
    if args.stage in ("flatness", "all"):
        stage_flatness(args)
        stage_paths(args)
    if args.stage in ("msharpness", "all"):
        stage_msharpness(args)
    if args.stage == "paths":
        stage_paths(args)
    if args.stage == "report":
        report(args)


if __name__ == "__main__":
    main()
