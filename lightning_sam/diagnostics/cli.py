"""``lightning-sam-flatness``: how sharp is a checkpoint, and is it flatter than another?

Example::

    lightning-sam-flatness runs/fashion_mnist_sgd/version_0/checkpoints/last.ckpt \\
        runs/fashion_mnist_sam/version_0/checkpoints/last.ckpt --labels SGD SAM --out flatness/

For each checkpoint it prints and writes (``flatness.json``) the mean training loss, the Hessian's top
eigenvalue(s), its trace (Hutchinson, ± standard error) and the m-sharpness at ρ, all on the same held-aside
training batches, and draws (``flatness_landscape.png``) a 1-D filter-normalized loss landscape of every
checkpoint on the same axes, plus the linear path between the first two checkpoints.

The model and data are rebuilt from the LightningCLI config the run saved (``config.yaml`` next to the
checkpoint's ``checkpoints/`` folder, or next to the checkpoint), or from ``--config``; the checkpoint's
``state_dict`` is then loaded. Batches: the first ``--num-batches`` of the data module's training loader, with the
torch RNG seeded by ``--seed`` (the same batches for every checkpoint). Loss: cross-entropy of ``module(x)``
against ``y`` on ``(x, y)`` batches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_sam.diagnostics._common import to_device
from lightning_sam.diagnostics.callback import cross_entropy_loss
from lightning_sam.diagnostics.hessian import hessian_eigenvalues, hessian_trace
from lightning_sam.diagnostics.landscape import linear_path, loss_landscape
from lightning_sam.diagnostics.sharpness import sharpness


def _default_label(path: Path) -> str:
    """``name/version_0/last`` for ``runs/name/version_0/checkpoints/last.ckpt``, else the file's stem."""
    if path.parent.name == "checkpoints" and len(path.parts) >= 4:
        return f"{path.parts[-4]}/{path.parts[-3]}/{path.stem}"
    return path.stem


def find_config(checkpoint: Path) -> Optional[Path]:
    """``config.yaml`` beside the checkpoint or beside its ``checkpoints/`` folder (where LightningCLI saves it)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def build_from_config(config: Path) -> tuple[Any, Any]:
    """The LightningModule and the LightningDataModule (or ``None``) of a LightningCLI config file."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule, LightningModule

    with open(config) as f:
        raw = yaml.safe_load(f) or {}
    if "fit" in raw and "model" not in raw:  # a config written for several subcommands
        raw = raw["fit"]
    if "model" not in raw:
        raise SystemExit(f"{config}: no `model:` section; pass the config the run was trained with (--config).")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model", required=True)
    parser.add_subclass_arguments(LightningDataModule, "data", required=False)
    parsed = parser.parse_object({"model": raw["model"], "data": raw.get("data")})
    init = parser.instantiate_classes(parsed)
    return init.model, init.get("data")


def load_batches(datamodule: Any, num_batches: int, seed: int) -> list[Any]:
    if datamodule is None:
        raise SystemExit("the config has no `data:` section: the command needs the training data.")
    datamodule.prepare_data()
    datamodule.setup("fit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batches = []
        for batch in datamodule.train_dataloader():
            batches.append(batch)
            if len(batches) == num_batches:
                break
    if len(batches) < num_batches:
        raise SystemExit(f"--num-batches {num_batches}: the training loader has only {len(batches)} batches")
    return batches


def measure(
    module: torch.nn.Module, batches: list[Any], args: argparse.Namespace, direction: Optional[list] = None
) -> dict[str, Any]:
    with torch.no_grad():
        loss = sum(float(cross_entropy_loss(module, b)) for b in batches) / len(batches)
    eigenvalues = hessian_eigenvalues(module, cross_entropy_loss, batches, k=args.k, tol=args.tol, seed=args.seed)
    trace = hessian_trace(module, cross_entropy_loss, batches, num_probes=args.trace_probes, tol=None, seed=args.seed)
    s = sharpness(module, cross_entropy_loss, batches, rho=args.rho, m=args.m)
    landscape = loss_landscape(
        module, cross_entropy_loss, batches, dims=1, steps=args.landscape_steps, span=(-1.0, 1.0), seed=args.seed
    )
    return {
        "loss": loss,
        "top_eigenvalue": float(eigenvalues[0]),
        "eigenvalues": eigenvalues.tolist(),
        "trace": trace.trace,
        "trace_std_error": trace.std_error,
        "sharpness": s,
        "rho": args.rho,
        "m": args.m,
        "landscape": {"alphas": landscape.alphas.tolist(), "losses": landscape.losses.tolist()},
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="lightning-sam-flatness",
        description="Hessian top eigenvalue, trace, m-sharpness and loss landscape of Lightning checkpoints.",
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, help="Lightning .ckpt files (same architecture)")
    parser.add_argument("--config", type=Path, default=None, help="LightningCLI config (default: the run's)")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per checkpoint (default: file names)")
    parser.add_argument("--num-batches", type=int, default=2, help="training batches measured on (default 2)")
    parser.add_argument("--k", type=int, default=1, help="top eigenvalues (default 1)")
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos residual tolerance (default 1e-3)")
    parser.add_argument("--trace-probes", type=int, default=50, help="Hutchinson probes (default 50)")
    parser.add_argument("--rho", type=float, default=0.05, help="ρ of the sharpness (default 0.05)")
    parser.add_argument("--m", type=int, default=None, help="examples per ε of the sharpness (default: the batch)")
    parser.add_argument("--landscape-steps", type=int, default=25, help="points of the 1-D landscape (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("flatness"), help="folder for flatness.json and the PNG")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        parser.error(f"--labels: {len(args.labels)} names for {len(args.checkpoints)} checkpoints")
    for path in args.checkpoints:
        if not path.is_file():
            parser.error(f"no such checkpoint: {path}")
    labels = args.labels or [_default_label(p) for p in args.checkpoints]
    config = args.config or find_config(args.checkpoints[0])
    if config is None:
        parser.error(f"no config.yaml found beside {args.checkpoints[0]}: pass --config (the config of the run)")

    modules, batches = [], None
    for path in args.checkpoints:
        module, datamodule = build_from_config(config)
        state = torch.load(path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"] if "state_dict" in state else state)
        modules.append(module.to(args.device).eval())
        if batches is None:
            batches = [
                to_device(b, torch.device(args.device)) for b in load_batches(datamodule, args.num_batches, args.seed)
            ]
    assert batches is not None
    results: dict[str, Any] = {"config": str(config), "num_batches": args.num_batches, "checkpoints": {}}
    for label, path, module in zip(labels, args.checkpoints, modules):
        results["checkpoints"][label] = {"path": str(path), **measure(module, batches, args)}
    if len(modules) >= 2:
        path = linear_path(
            modules[0], modules[1], cross_entropy_loss, batches, steps=args.landscape_steps, span=(-0.25, 1.25)
        )
        results["linear_path"] = {
            "from": labels[0],
            "to": labels[1],
            "ts": path.ts.tolist(),
            "losses": path.losses.tolist(),
        }

    print(f"{'checkpoint':<24} {'loss':>8} {'top eigenvalue':>15} {'trace':>20} {'sharpness':>10}")
    for label, r in results["checkpoints"].items():
        trace = f"{r['trace']:.1f} ± {r['trace_std_error']:.1f}"
        print(f"{label:<24} {r['loss']:>8.4f} {r['top_eigenvalue']:>15.3f} {trace:>20} {r['sharpness']:>10.4f}")
    if len(modules) >= 2:
        first, second = (results["checkpoints"][lab]["top_eigenvalue"] for lab in labels[:2])
        print(f"top eigenvalue ratio {labels[1]}/{labels[0]}: {second / first:.3f}" if first else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flatness.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, args.out / "flatness_landscape.png")
    print(f"wrote {args.out / 'flatness.json'} and {args.out / 'flatness_landscape.png'}")
    return results


def _plot(results: dict[str, Any], path: Path) -> None:
    from lightning_sam.diagnostics.plotting import plot_landscape_1d, plot_linear_path, pyplot

    plt = pyplot()
    panels = 2 if "linear_path" in results else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)
    curves = {
        label: (torch.tensor(r["landscape"]["alphas"]), torch.tensor(r["landscape"]["losses"]))
        for label, r in results["checkpoints"].items()
    }
    plot_landscape_1d(curves, ax=axes[0][0])
    if panels == 2:
        lp = results["linear_path"]
        plot_linear_path(
            torch.tensor(lp["ts"]), torch.tensor(lp["losses"]), labels=(lp["from"], lp["to"]), ax=axes[0][1]
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
