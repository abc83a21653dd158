"""Step time and peak memory: SGD vs SAM through the callback, the mixin and SAMOptimizer, in one run.

Each configuration runs in a fresh subprocess (so peak memory is its own), on synthetic data of the model's input
shape (timing only), for ``--steps`` optimizer steps after ``--warmup``. Reported:

- median step time and SAM/SGD ratio (Lightning SGD for the callback and mixin, a plain PyTorch SGD loop for
  SAMOptimizer);
- the time spent in the SAM math itself (computing ε, perturbing, restoring) as a share of the SAM step: the
  overhead beyond the second forward-backward pass;
- peak memory: CUDA ``max_memory_allocated`` on a GPU, peak RSS of the process on CPU.

Usage::

    python benchmarks/step_time.py                      # CPU (and CUDA when present), both models
    python benchmarks/step_time.py --models small_cnn --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("sgd", "callback", "mixin", "torch-sgd", "sam-optimizer", "peer-sam")
# The variants, each through the SAM callback, with the cost the engine should show (forward-backward passes per step,
# SGD = 1) and the extra parameter-sized buffers beyond SAM's copy of w.
VARIANTS = {
    "looksam": ("LookSAM(k=5)", "1 + 1/k = 1.2", "1 (g_v), +1 on SAM steps"),
    "aesam": ("AESAM(c=0.0)", "1 + share of SAM steps", "0"),
    "random": ("RandomSAM(p=0.5)", "1 + p = 1.5", "0"),
    "msam": ("MSAM()", "1", "0"),
    "esam": ("ESAM(beta=0.6, gamma=0.5)", "≈ 1.5 to 1.8 (SDS adds a no-grad forward)", "0"),
    "gsam": ("GSAM(alpha=0.1)", "2", "1 (g)"),
    "fsam": ("FriendlySAM()", "2", "1 (m)"),
    "samon": ("SAMON()", "< 2 (first backward: norm layers' weights only)", "0"),
}
# "peer-sam": the SAM of PyPI's pytorch-optimizer (`pip install pytorch-optimizer`), in the same plain loop as
# "sam-optimizer"; skipped when it is not installed.
MODELS = {
    # name: (constructor, input shape, classes, default batch on CPU, on CUDA)
    "small_cnn": ("SmallCNN", (1, 28, 28), 10, 128, 256),
    "resnet18": ("ResNet18", (3, 32, 32), 10, 32, 128),
}


def _build(model_name: str):
    import lightning_sam.models as models

    cls_name, shape, classes, _, _ = MODELS[model_name]
    net = getattr(models, cls_name)(num_classes=classes, in_channels=shape[0])
    return net, shape, classes


def run_one(
    model_name: str, mode: str, device: str, batch: int, steps: int, warmup: int, threads: int
) -> dict[str, Any]:
    """One configuration, in this process."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    import lightning_sam.perturbation as perturbation
    from lightning_sam import SAM, SAMModule, SAMOptimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, shape, classes = _build(model_name)
    total = warmup + steps
    xs = torch.randn(total, batch, *shape)
    ys = torch.randint(0, classes, (total, batch))

    # Time inside the SAM math, measured around the library's own functions (synchronised on CUDA).
    math_time = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            math_time[0] += time.perf_counter() - start
            return out

        return wrapper

    import lightning_sam.optimizer as optimizer_module
    import lightning_sam.step as step_module

    for module in (step_module, optimizer_module):
        module.perturb_ = timed(perturbation.perturb_)
        module.restore_ = timed(perturbation.restore_)

    times: list[float] = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if mode in ("torch-sgd", "sam-optimizer", "peer-sam"):
        net = net.to(device)
        if mode == "torch-sgd":
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        elif mode == "peer-sam":
            from pytorch_optimizer import SAM as PeerSAM

            opt = PeerSAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
        else:
            opt = SAMOptimizer(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
        for i in range(total):
            x, y = xs[i].to(device), ys[i].to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            F.cross_entropy(net(x), y).backward()
            if mode == "torch-sgd":
                opt.step()
                opt.zero_grad()
            else:
                opt.first_step(zero_grad=True)
                F.cross_entropy(net(x), y).backward()
                opt.second_step(zero_grad=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i == warmup - 1:
                math_time[0] = 0.0
            if i >= warmup:
                times.append(time.perf_counter() - start)
    else:

        class Classifier(pl.LightningModule):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.net = net

            def training_step(self, batch, batch_idx):
                x, y = batch
                losses = F.cross_entropy(self.net(x), y, reduction="none")
                return {"loss": losses.mean(), "losses": losses}  # ESAM's data selection reads "losses"

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        class SAMClassifier(SAMModule, Classifier):
            pass

        class Timer(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if device == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()
                if batch_idx == warmup:
                    math_time[0] = 0.0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if device == "cuda":
                    torch.cuda.synchronize()
                if batch_idx >= warmup:
                    times.append(time.perf_counter() - self.start)

        callbacks: list[pl.Callback] = [Timer()]
        if mode in VARIANTS:
            from lightning_sam import variants  # noqa: F401  (used by eval)

            variant = eval(f"variants.{VARIANTS[mode][0]}")
            model, callbacks = Classifier(), callbacks + [SAM(rho=0.05, variant=variant)]
        elif mode == "callback":
            model, callbacks = Classifier(), callbacks + [SAM(rho=0.05)]
        elif mode == "mixin":
            model = SAMClassifier(rho=0.05)
        else:
            model = Classifier()
        loader = torch.utils.data.DataLoader(list(zip(xs, ys)), batch_size=None)
        trainer = pl.Trainer(
            accelerator=device,
            devices=1,
            max_steps=total,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, loader)

    # A variant mixes SAM and plain steps: its cost is the mean step; the other modes report the median.
    median = statistics.mean(times) if mode in VARIANTS else statistics.median(times)
    sam_math = math_time[0] / steps
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "model": model_name,
        "mode": mode,
        "device": device,
        "batch": batch,
        "median_step_s": median,
        "sam_math_s": sam_math,
        "peak_memory_mb": peak / 2**20,
        "params_mb": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)"
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="override the per-model default batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=[*MODES, *VARIANTS], help="entry points and variants"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure every mode this many times, interleaved; report the median"
    )
    parser.add_argument("--_one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._one:
        model_name, mode, device = args._one
        batch = args.batch or MODELS[model_name][3 if device == "cpu" else 4]
        print(json.dumps(run_one(model_name, mode, device, batch, args.steps, args.warmup, args.threads)))
        return

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    runs: dict[tuple, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every mode alike
        for device in devices:
            for model_name in args.models:
                for mode in args.modes:
                    if mode == "peer-sam" and importlib.util.find_spec("pytorch_optimizer") is None:
                        print("  skipping peer-sam: pip install pytorch-optimizer to compare", file=sys.stderr)
                        continue
                    row = _run_subprocess(args, model_name, mode, device)
                    runs.setdefault((device, model_name, mode), []).append(row)
                    print(f"  done {device} {model_name} {mode}: {row['median_step_s'] * 1e3:.1f} ms", file=sys.stderr)
    rows = []
    for same in runs.values():
        row = dict(same[0])
        row["median_step_s"] = statistics.median(r["median_step_s"] for r in same)
        row["sam_math_s"] = statistics.median(r["sam_math_s"] for r in same)
        row["peak_memory_mb"] = max(r["peak_memory_mb"] for r in same)
        row["repeats"] = len(same)
        rows.append(row)
    print(_table(rows))
    if any(r["mode"] in VARIANTS for r in rows):
        print("\n| variant | expected passes per step | extra buffers (parameter-sized) |\n|---|---|---|")
        for ctor, passes, memory in VARIANTS.values():
            print(f"| {ctor} | {passes} | {memory} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _run_subprocess(args: argparse.Namespace, model_name: str, mode: str, device: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_one", model_name, mode, device]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def _table(rows: list[dict[str, Any]]) -> str:
    base = {(r["device"], r["model"], r["mode"]): r for r in rows}
    lines = [
        "| device | model | batch | entry point | median step (ms) | vs SGD | SAM math (% of step) "
        "| peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain_loop = r["mode"] in ("sam-optimizer", "peer-sam")
        ref = base.get((r["device"], r["model"], "torch-sgd" if plain_loop else "sgd"))
        ratio = r["median_step_s"] / ref["median_step_s"] if ref and r["mode"] not in ("sgd", "torch-sgd") else None
        ours = r["mode"] in ("callback", "mixin", "sam-optimizer", *VARIANTS)
        share = 100 * r["sam_math_s"] / r["median_step_s"] if ours else None
        name = f"{r['mode']}: {VARIANTS[r['mode']][0]}" if r["mode"] in VARIANTS else r["mode"]
        lines.append(
            f"| {r['device']} | {r['model']} | {r['batch']} | {name} | {r['median_step_s'] * 1e3:.1f} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if share is None else f'{share:.2f}'} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
