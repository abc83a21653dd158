"""Helpers for tests/test_distributed.py: a tiny linear regression, a recording callback, a hand-written DDP loop
with ``SAMOptimizer``, and the independent reference math (analytic gradients, float64).

Processes are started with the "fork" start method (``DDPStrategy(start_method="fork")`` in Lightning, i.e.
``strategy="ddp_fork"``; ``torch.multiprocessing.start_processes(..., start_method="fork")`` for the plain loop):
the children inherit the already-imported torch/Lightning, so a 2-process fit costs well under a second instead of
~10 s for "spawn". Every worker writes its results to ``out_dir / f"rank{r}.pt"`` (torch.save); nothing is passed
back through return values.
"""

from __future__ import annotations

import socket
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_sam import SAMModule

WORLD = 2
N = 24  # examples in the data set: 12 per rank
D = 3  # input features
W0 = [[0.3, -0.2, 0.1]]  # initial weight of the Linear(3, 1)
B0 = [0.05]  # initial bias
TIMEOUT = timedelta(seconds=30)  # process-group timeout: a collective that never completes raises instead of hanging


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, D, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3 + 0.3 * torch.randn(N, 1, generator=g)
    return x, y


def shard_indices(rank: int) -> list[int]:
    """The examples rank ``rank`` trains on in epoch 0, in order.

    Lightning 2.6 replaces the training sampler with ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED or 0)``
    whatever the DataLoader's ``shuffle`` (``_process_dataloader`` sets ``is_shuffled = True`` for the training
    stage), so the reference uses that sampler too (the tests unset PL_GLOBAL_SEED). The test also checks that each
    rank saw exactly these examples.
    """
    sampler = DistributedSampler(range(N), num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(0)
    return list(sampler)


def init_linear(layer: torch.nn.Linear) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W0))
        layer.bias.copy_(torch.tensor(B0))


# ---------------------------------------------------------------------------------------------------- Lightning side
class LinReg(pl.LightningModule):
    """Linear regression with MSE. ``first_pass_factor[(global_step, global_rank)]`` multiplies the loss of the first
    (unperturbed) SAM pass of that step on that rank; passes alternate first/second, so the module tells them apart
    by counting its own calls (``sam=True``)."""

    def __init__(
        self,
        batch_size: int,
        lr: float = 0.1,
        sam: bool = True,
        first_pass_factor: Optional[dict[tuple[int, int], float]] = None,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.lr = lr
        self.sam = sam
        self.first_pass_factor = dict(first_pass_factor or {})
        if batchnorm:
            self.net = torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        else:
            self.net = torch.nn.Linear(D, 1)
            init_linear(self.net)
        self._calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        first = (self._calls % 2 == 0) if self.sam else True
        self._calls += 1
        loss = F.mse_loss(self.net(x), y)
        factor = self.first_pass_factor.get((self.trainer.global_step, self.trainer.global_rank))
        if first and factor is not None:
            loss = loss * factor
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        x, y = make_data()
        # Lightning replaces the sampler with a DistributedSampler (see `shard_indices`).
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=False)


class CountingHookState:
    def __init__(self) -> None:
        self.calls = 0


def counting_allreduce_hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP's default all-reduce (mean), counting the buckets it reduces."""
    state.calls += 1
    return default_hooks.allreduce_hook(None, bucket)


class Recorder(pl.Callback):
    """Runs in every rank: counts DDP all-reduces through a comm hook, snapshots the parameters after each batch,
    records the batches each rank saw, the fp16 loss scale and (optionally) the warnings; saves all of it to
    ``out_dir / f"rank{r}.pt"`` at ``on_fit_end``."""

    def __init__(self, out_dir: Path, record_warnings: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.record_warnings = record_warnings
        self.hook_state = CountingHookState()
        self.snapshots: list[dict[str, Any]] = []
        self.seen: list[torch.Tensor] = []
        self._catcher: Optional[warnings.catch_warnings] = None
        self._warnings: list[Any] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)  # in the forked child: tiny tensors, and no OpenMP pool inherited across the fork
        if self.record_warnings:
            self._catcher = warnings.catch_warnings(record=True)
            self._warnings = self._catcher.__enter__()
            warnings.simplefilter("always")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        assert isinstance(model, DistributedDataParallel), type(model)
        model.register_comm_hook(self.hook_state, counting_allreduce_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch[0].detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.snapshots.append(
            {
                "global_step": trainer.global_step,
                "params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                "scale": None if scaler is None else float(scaler.get_scale()),
            }
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None
        sam = [cb for cb in trainer.callbacks if type(cb).__name__ == "SAM"]
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "hook_calls": self.hook_state.calls,
            "global_step": trainer.global_step,
            "final": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "snapshots": self.snapshots,
            "seen": self.seen,
            "warnings": [str(w.message) for w in self._warnings],
            "sam_counters": sam[0].state_dict() if sam else None,
        }
        torch.save(result, self.out_dir / f"rank{trainer.global_rank}.pt")


def load_ranks(out_dir: Path) -> list[dict[str, Any]]:
    results = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD))
    return results


# ---------------------------------------------------------------------------------------------- plain PyTorch DDP
def plain_ddp_worker(
    rank: int, port: int, out_dir: str, use_no_sync: bool, steps: int, batch: int, rho: float, lr: float
) -> None:
    """A hand-written DDP loop with ``SAMOptimizer`` (gloo, CPU). Rank r trains on its DistributedSampler shard."""
    from lightning_sam import SAMOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    try:
        model = torch.nn.Linear(D, 1)
        init_linear(model)
        ddp = DistributedDataParallel(model)
        state = CountingHookState()
        ddp.register_comm_hook(state, counting_allreduce_hook)
        opt = SAMOptimizer(ddp.parameters(), torch.optim.SGD, rho=rho, lr=lr)
        x, y = make_data()
        idx = shard_indices(rank)
        for step in range(steps):
            sel = idx[step * batch : (step + 1) * batch]
            xb, yb = x[sel], y[sel]
            if use_no_sync:
                with ddp.no_sync():
                    F.mse_loss(ddp(xb), yb).backward()
            else:
                F.mse_loss(ddp(xb), yb).backward()
            opt.first_step(zero_grad=True)
            F.mse_loss(ddp(xb), yb).backward()
            opt.second_step(zero_grad=True)
        torch.save(
            {
                "rank": rank,
                "hook_calls": state.calls,
                "final": {k: v.detach().clone() for k, v in model.named_parameters()},
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- reference math (float64)
def _grads(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic gradient of mean((x wᵀ + b - y)²)."""
    r = x @ w.T + b - y  # (n, 1)
    n = x.shape[0]
    return 2.0 / n * r.T @ x, 2.0 / n * r.sum(0)


def sam_grad(w, b, x, y, rho: float, first_factor: float = 1.0, eps_override=None):
    """h = ∇L(w + ε), ε = ρ g/‖g‖ with g = first_factor·∇L(w) (ε = 0 for g = 0). ``eps_override``: a given ε."""
    if eps_override is None:
        gw, gb = _grads(w, b, x, y)
        gw, gb = gw * first_factor, gb * first_factor
        norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
        if norm == 0:
            ew, eb = torch.zeros_like(w), torch.zeros_like(b)
        else:
            ew, eb = rho * gw / (norm + 1e-12), rho * gb / (norm + 1e-12)
    else:
        ew, eb = eps_override
    return _grads(w + ew, b + eb, x, y)


def initial_params() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(W0, dtype=torch.float64), torch.tensor(B0, dtype=torch.float64)


def data64() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data()
    return x.double(), y.double()


def reference_ddp_sam(
    steps: int,
    batch: int,
    rho: float,
    lr: float,
    m: Optional[int] = None,
    accumulate: int = 1,
    first_factor: Optional[dict[tuple[int, int], float]] = None,
    skip_steps: tuple[int, ...] = (),
    mode: str = "per_shard",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Parameters after each optimizer step of SAM + SGD on 2 ranks, written with plain loops.

    Rank r's i-th micro-batch is ``shard_indices(r)[i*batch:(i+1)*batch]``; optimizer step s uses micro-batches
    ``s*accumulate ... s*accumulate+accumulate-1``. Per rank and micro-batch, the batch is cut into chunks of ``m``;
    every chunk gets its own ε from its own gradient, its perturbed gradient is weighted by chunk size / batch size;
    micro-batches are weighted 1/accumulate; the update uses the mean over ranks.
    ``mode="global_eps"``: ε from the all-reduced (rank-averaged) gradient instead (DDP without no_sync).
    ``mode="sgd"``: no SAM. ``skip_steps``: steps that leave the weights unchanged (fp16 overflow).
    """
    x, y = data64()
    w, b = initial_params()
    history = []
    for s in range(steps):
        if s in skip_steps:
            history.append((w.clone(), b.clone()))
            continue
        hw, hb = torch.zeros_like(w), torch.zeros_like(b)
        shards = []
        for r in range(WORLD):
            idx = shard_indices(r)
            for j in range(accumulate):
                mb = s * accumulate + j
                shards.append((r, idx[mb * batch : (mb + 1) * batch]))
        if mode == "global_eps":
            assert m is None and accumulate == 1
            gws, gbs = zip(*(_grads(w, b, x[sel], y[sel]) for _, sel in shards))
            gw, gb = sum(gws) / WORLD, sum(gbs) / WORLD
            norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
            eps = (rho * gw / norm, rho * gb / norm)
        for r, sel in shards:
            chunk = m or len(sel)
            for c in range(0, len(sel), chunk):
                csel = sel[c : c + chunk]
                share = len(csel) / len(sel) / accumulate / WORLD
                xc, yc = x[csel], y[csel]
                if mode == "sgd":
                    gw, gb = _grads(w, b, xc, yc)
                elif mode == "global_eps":
                    gw, gb = sam_grad(w, b, xc, yc, rho, eps_override=eps)
                else:
                    factor = (first_factor or {}).get((s, r), 1.0)
                    gw, gb = sam_grad(w, b, xc, yc, rho, first_factor=factor)
                hw, hb = hw + share * gw, hb + share * gb
        w, b = w - lr * hw, b - lr * hb
        history.append((w.clone(), b.clone()))
    return history


def as_pair(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    (wk,) = [k for k in params if k.endswith("weight")]
    (bk,) = [k for k in params if k.endswith("bias")]
    return params[wk].double(), params[bk].double()


def max_diff(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    return max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())


class SAMLinReg(SAMModule, LinReg):
    """The same module behind the SAMModule mixin (manual optimization)."""


class LinRegUnused(LinReg):
    """LinReg with a parameter that the loss never uses (DDP's find_unused_parameters case)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unused = torch.nn.Linear(D, 1)


class SAMLinRegUnused(SAMModule, LinRegUnused):
    pass
