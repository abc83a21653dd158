"""The cost–accuracy study of the SAM variants: test error against wall-clock time, relative to SGD.

Fashion-MNIST (offline), SmallCNN, SGD + momentum + cosine LR; every method trains with the same budget (epochs),
the same data order and the same noisy labels for a given seed; only the ``SAM`` callback (and its variant)
differs. Two regimes: 40% symmetric label noise on a 2,000-image subset (where SGD memorises the noise and SAM's gain
is large), and the same subset with clean labels.

Protocol (validation split only; the test set is read once per final run):

1. ``tune-rho``: seed 0, each regime: SAM's ρ on a grid, and MSAM's (whose ρ lives on another scale);
2. ``tune-knob``: seed 0, each regime: each variant's own knob on a grid, at SAM's chosen ρ;
3. ``final``: seeds 0, 1, 2 with the chosen settings (seed 0 reuses its tuning run).

Each finished run appends one JSON line to ``--out``; a run already there is skipped, so the study resumes where it
stopped. Runs go to ``--workers`` processes with one CPU thread each; the wall-clock time is measured around
``trainer.fit`` in the run's own process, and compared within a seed (same machine, same load). ``--report``
regenerates the table, the Pareto plot and the section of ``docs/results.md`` from the raw runs.

Usage::

    python examples/efficient_sam_study.py                 # all phases
    python examples/efficient_sam_study.py --report        # table + docs/img/efficient_sam.png + docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from typing import Any, Optional

from fashion_mnist_run import run_all

# The variants, their knob grid (tuned on the validation split) and how each is built.
KNOBS: dict[str, list[dict[str, Any]]] = {
    "looksam": [{"k": 2}, {"k": 5}],
    "aesam": [{"c": 0.0}, {"c": 1.0}],
    "random": [{"p": 0.25}, {"p": 0.5}],
    "esam": [{"beta": 0.6, "gamma": 0.5}, {"beta": 1.0, "gamma": 0.5}],
    "gsam": [{"alpha": 0.1}, {"alpha": 0.3}],
    "fsam": [{"lmbda": 0.6}, {"lmbda": 0.9}],
}
# Methods whose ρ lives on another scale than SAM's get their own ρ grid (and no other knob).
RHO_GRID = {"sam": [0.05, 0.1, 0.2], "msam": [0.3, 1.0, 3.0], "samon": [0.2, 0.5, 1.0]}
EFFICIENT = ("looksam", "aesam", "random", "msam", "esam")
SHARPER = ("gsam", "fsam", "samon")
REGIMES = {"noise40": 0.4, "clean": 0.0}
LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "looksam": "LookSAM",
    "aesam": "AE-SAM",
    "random": "RandomSAM",
    "msam": "MSAM",
    "esam": "ESAM",
    "gsam": "GSAM",
    "fsam": "Friendly-SAM",
    "samon": "SAM-ON",
}
SEEDS = (0, 1, 2)
# The cost of a run: the CPU time of its training process (one thread). On a machine shared with other jobs the
# wall-clock time of a run depends on their load; with one thread, CPU time is what wall-clock time is on an idle
# machine. benchmarks/variant_cost.py checks the ratios with timed steps on a quiet machine.
TIME = "train_cpu_seconds"


def build_variant(method: str, knobs: dict[str, Any]):
    from lightning_sam import variants

    if method == "looksam":
        return variants.LookSAM(k=knobs["k"], alpha=0.7)
    if method == "aesam":
        return variants.AESAM(c=knobs["c"])
    if method == "random":
        return variants.RandomSAM(p=knobs["p"], seed=knobs.get("seed", 0))
    if method == "esam":
        return variants.ESAM(beta=knobs["beta"], gamma=knobs["gamma"])
    if method == "msam":
        return variants.MSAM()
    if method == "gsam":  # ρ follows the cosine LR from the run's ρ down to 0
        return variants.GSAM(alpha=knobs["alpha"], rho_max=knobs["rho"], rho_min=0.0)
    if method == "fsam":
        return variants.FriendlySAM(sigma=1.0, lmbda=knobs["lmbda"])
    if method == "samon":
        return variants.SAMON()
    return None


def train_one(run: dict[str, Any]) -> dict[str, Any]:
    import torch.nn.functional as F
    from fashion_mnist_run import fit_and_test

    from lightning_sam import SAM
    from lightning_sam.models import ImageClassifier

    class Classifier(ImageClassifier):
        """Also returns the per-example losses (ESAM's data selection reads them; the others ignore them)."""

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            self.train_acc(logits, y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
            return {"loss": losses.mean(), "losses": losses}

    sam = None
    if run["method"] != "sgd":
        knobs = {**run["knobs"], "seed": run["seed"], "rho": run["rho"]}
        sam = SAM(rho=run["rho"], variant=build_variant(run["method"], knobs))
    result = fit_and_test(
        run,
        callbacks=[sam] if sam is not None else [],
        module_cls=Classifier,
        check_val_every_n_epoch=run["epochs"],  # validate once, at the end: selection only, not part of the cost
        num_sanity_val_steps=0,
    )
    steps = result["trainer"].global_step
    counters = sam.counters.state_dict() if sam is not None else {"sam_steps": 0, "plain_steps": steps}
    return {
        **run,
        "test_error": 1.0 - result["test"]["test/acc"],
        "val_error": 1.0 - result["val_acc"],
        "train_acc": result["train_metrics"].get("train/acc", float("nan")),
        "train_seconds": result["train_seconds"],
        "train_cpu_seconds": result["train_cpu_seconds"],
        "sam_steps": counters["sam_steps"],
        "plain_steps": counters["plain_steps"],
    }


def _key(run: dict[str, Any]) -> str:
    fields = ("method", "noise", "seed", "rho", "knobs", "epochs", "train_subset", "width", "lr")
    return json.dumps({k: run[k] for k in fields}, sort_keys=True)


def _load(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _base(args: argparse.Namespace) -> dict[str, Any]:
    return dict(epochs=args.epochs, train_subset=args.train_subset, width=args.width, lr=args.lr, threads=1)


def _matching(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The runs of these settings, one per run key (the first, should two processes of the study have run it)."""
    base = _base(args)
    unique: dict[str, dict] = {}
    for r in rows:
        if all(r[k] == base[k] for k in ("epochs", "train_subset", "width", "lr")):
            unique.setdefault(_key(r), r)
    return list(unique.values())


TUNE_NOISE = 0.4  # settings are picked on this regime's validation split and used in both regimes (CPU budget)


def best(rows: list[dict], method: str, noise: float, rho: Optional[float] = None) -> Optional[dict]:
    """The seed-0 run of ``method`` on the tuning regime with the lowest validation error (ties: the first)."""
    cands = [r for r in rows if r["method"] == method and r["noise"] == TUNE_NOISE and r["seed"] == 0]
    if rho is not None:
        cands = [r for r in cands if r["rho"] == rho]
    return min(cands, key=lambda r: r["val_error"]) if cands else None


def phase_runs(phase: str, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    base = _base(args)
    wanted = ("sgd", "sam", *args.methods)
    runs = []
    for noise in args.regimes:
        if phase != "final" and noise != TUNE_NOISE:
            continue
        if phase == "tune-rho":
            runs.append(dict(base, method="sgd", noise=noise, seed=0, rho=0.0, knobs={}))
            for method, grid in RHO_GRID.items():
                if method in wanted:
                    runs += [dict(base, method=method, noise=noise, seed=0, rho=rho, knobs={}) for rho in grid]
        elif phase == "tune-knob":
            sam = best(rows, "sam", noise)
            for method, grid in KNOBS.items():
                if method in wanted:
                    runs += [dict(base, method=method, noise=noise, seed=0, rho=sam["rho"], knobs=k) for k in grid]
        else:
            for method in wanted:
                chosen = chosen_setting(rows, method, noise)
                runs += [dict(base, method=method, noise=noise, seed=s, **chosen) for s in SEEDS]
    return runs


def chosen_setting(rows: list[dict], method: str, noise: float) -> dict[str, Any]:
    if method == "sgd":
        return {"rho": 0.0, "knobs": {}}
    pick = best(rows, method, noise) if method in RHO_GRID else None
    if method not in RHO_GRID:
        sam = best(rows, "sam", noise)
        pick = best(rows, method, noise, rho=sam["rho"])
    return {"rho": pick["rho"], "knobs": pick["knobs"]}


def study(args: argparse.Namespace) -> None:
    for phase in ("tune-rho", "tune-knob", "final"):
        rows = _matching(_load(args.out), args)
        done = {_key(r) for r in rows}
        todo = [r for r in phase_runs(phase, rows, args) if _key(r) not in done]
        todo = list({_key(r): r for r in todo}.values())
        print(f"[{phase}] {len(todo)} runs to go", flush=True)
        run_all(train_one, todo, args.out, args.workers, _describe)


def _describe(row: dict[str, Any]) -> str:
    return (
        f"  {row['method']} noise={row['noise']} seed={row['seed']} rho={row['rho']} {row['knobs']}:"
        f" val {row['val_error']:.4f} test {row['test_error']:.4f} ({row['train_seconds']:.0f}s)"
    )


# ---------------------------------------------------------------------------------------------------- report
def summarise(rows: list[dict], noise: float) -> list[dict[str, Any]]:
    """One line per method: chosen setting, test error over the final seeds, time relative to SGD (same seed)."""
    sgd = {r["seed"]: r for r in rows if r["method"] == "sgd" and r["noise"] == noise and r["seed"] in SEEDS}
    lines = []
    for method in LABELS:
        try:
            setting = chosen_setting(rows, method, noise)
        except (TypeError, KeyError):
            continue
        runs = [
            r
            for r in rows
            if r["method"] == method
            and r["noise"] == noise
            and r["seed"] in SEEDS
            and r["rho"] == setting["rho"]
            and r["knobs"] == setting["knobs"]
        ]
        if not runs:
            continue
        ratios = [
            r[TIME] / sgd[r["seed"]][TIME] for r in runs if r["seed"] in sgd and TIME in r and TIME in sgd[r["seed"]]
        ]
        errors = [100 * r["test_error"] for r in runs]
        steps = [r["sam_steps"] / max(1, r["sam_steps"] + r["plain_steps"]) for r in runs]
        lines.append(
            dict(
                method=method,
                setting=setting,
                seeds=len(runs),
                error=statistics.mean(errors),
                error_std=statistics.stdev(errors) if len(errors) > 1 else 0.0,
                time=statistics.mean(ratios) if ratios else float("nan"),
                time_std=statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                sam_fraction=statistics.mean(steps),
            )
        )
    by = {line["method"]: line for line in lines}
    if "sgd" in by and "sam" in by:
        gain = by["sgd"]["error"] - by["sam"]["error"]
        for line in lines:
            line["gain_kept"] = (by["sgd"]["error"] - line["error"]) / gain if gain else float("nan")
    return lines


def _setting_text(line: dict) -> str:
    parts = [] if line["method"] == "sgd" else [f"ρ={line['setting']['rho']}"]
    parts += [f"{k}={v}" for k, v in line["setting"]["knobs"].items()]
    return ", ".join(parts) or "-"


def report(args: argparse.Namespace) -> str:
    rows = _matching(_load(args.out), args)
    out = []
    for noise in REGIMES.values():
        lines = summarise(rows, noise)
        if not lines:
            continue
        title = "40% label noise" if noise else "clean labels"
        out.append(
            f"**{title}** ({args.train_subset} training images, {args.epochs} epochs, SmallCNN width {args.width})"
        )
        out.append("")
        out.append(
            "| method | setting (picked on validation) | test error (%) | CPU time vs SGD | SAM steps"
            " | share of SAM's gain |"
        )
        out.append("|---|---|---|---|---|---|")
        by = {line["method"]: line for line in lines}
        sam_gains = "sgd" in by and "sam" in by and by["sgd"]["error"] - by["sam"]["error"] > by["sam"]["error_std"]
        for line in lines:
            kept = line.get("gain_kept", float("nan"))
            share = "" if line["method"] in ("sgd", "sam") else (f"{100 * kept:.0f}%" if sam_gains else "n/a")
            out.append(
                f"| {LABELS[line['method']]} | {_setting_text(line)} | {line['error']:.2f} ± {line['error_std']:.2f}"
                f" | {line['time']:.2f}x ± {line['time_std']:.2f} | {100 * line['sam_fraction']:.0f}% | {share} |"
            )
        if not sam_gains:
            out.append("")
            out.append("SAM does not beat SGD here (by more than a standard deviation): no gain to share.")
        out.append("")
    text = "\n".join(out)
    print(text)
    _plot(rows, args.plot)
    _write_docs(text, args.docs)
    return text


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, noise in zip(axes, REGIMES.values()):
        for line in summarise(rows, noise):
            ax.errorbar(
                line["time"],
                line["error"],
                xerr=line["time_std"],
                yerr=line["error_std"],
                marker="o",
                capsize=3,
                label=LABELS[line["method"]],
            )
            ax.annotate(
                LABELS[line["method"]],
                (line["time"], line["error"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.axvline(1.3, color="gray", ls=":", lw=1)
        ax.set_xlabel("training time relative to SGD (CPU seconds, one thread)")
        ax.set_ylabel("test error (%)")
        ax.set_title("40% label noise" if noise else "clean labels")
        ax.grid(alpha=0.3)
    fig.suptitle("Fashion-MNIST: cost and test error of SAM variants (mean ± std, 3 seeds)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


START, END = "<!-- efficient-sam-study:start -->", "<!-- efficient-sam-study:end -->"


def _write_docs(table: str, path: str) -> None:
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    block = f"{START}\n{table}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/efficient_sam.jsonl")
    parser.add_argument("--regimes", type=float, nargs="+", default=list(REGIMES.values()))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[*EFFICIENT, *SHARPER],
        choices=[*EFFICIENT, *SHARPER],
        help="the variants to run besides SGD and SAM",
    )
    parser.add_argument("--report", action="store_true", help="regenerate the table, plot and docs section only")
    parser.add_argument("--plot", default="docs/img/efficient_sam.png")
    parser.add_argument("--docs", default="docs/results.md")
    args = parser.parse_args()
    if args.report:
        report(args)
    else:
        study(args)


if __name__ == "__main__":
    main()
