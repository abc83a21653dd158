"""``FlatnessMonitor``: log the Hessian's top eigenvalue, its trace and the m-sharpness during a Lightning fit."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_sam.rng import get_rng_state, set_rng_state
from lightning_sam.diagnostics._common import LossFn, check_int, check_positive, to_device
from lightning_sam.diagnostics.hessian import hessian_eigenvalues, hessian_spectrum, hessian_trace
from lightning_sam.diagnostics.sharpness import sharpness


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    """The default ``loss_fn``: ``F.cross_entropy(model(batch[0]), batch[1])`` for ``(inputs, targets)`` batches."""
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


@contextmanager
def _all_rngs_preserved() -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and CUDA) global RNG states, put back on exit."""
    py = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    torch_state = get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        if np is not None:
            np.random.set_state(np_state)
        set_rng_state(torch_state)


def _detached_copy(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.detach().clone()
    if isinstance(batch, dict):
        return type(batch)((k, _detached_copy(v)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        items = [_detached_copy(v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


class FlatnessMonitor(Callback):
    r"""Log how flat the training run's weights are: the Hessian's top eigenvalue(s), its trace and the m-sharpness.

    At ``setup`` the callback holds aside the first ``num_batches`` batches of the training dataloader (copies,
    read with every global RNG saved and restored, so the run's data order is untouched). Every ``every_n_epochs``
    epochs (at ``on_train_epoch_end``) or every ``every_n_steps`` optimizer steps (at ``on_train_batch_end``, i.e.
    after the optimizer step and so never inside a SAM step) it measures, on those batches and with the model in
    eval mode (BatchNorm on its running statistics):

    - ``flatness/top_eigenvalue`` (and ``flatness/eigenvalue_{i}`` for i < ``k``): ``hessian_eigenvalues``;
    - ``flatness/trace``: ``hessian_trace`` with ``trace_probes`` probes (0: off);
    - ``flatness/sharpness``: ``sharpness`` at ρ, ``m`` and ``adaptive`` taken from the Trainer's ``SAM``
      callback if there is one, else from the arguments (``rho=None`` and no ``SAM``: 0.05).

    Every measurement runs inside ``preserved_state``: weights, buffers (BatchNorm statistics), ``.grad``, modes and
    the torch RNG are restored bit for bit, the optimizer is never touched and nothing is logged under the module's
    keys, so a run with the monitor trains exactly as one without it. Each measurement is also appended to
    ``history`` (with the spectrum when ``spectrum_steps > 0``).

    Distributed (DDP): rank 0 measures and broadcasts. The batches held aside are rank 0's (the first batches of its
    training dataloader as the module or datamodule returns it, before Lightning adds a ``DistributedSampler``),
    broadcast to every rank at ``setup``; at each measurement rank 0 computes on its weights and its BatchNorm
    statistics (under DDP these are rank 0's until the next forward broadcasts them) and broadcasts the record, so
    every rank logs and keeps the same values and the other ranks spend no compute (they wait at the broadcast).
    The evaluation uses the unwrapped module: no DDP collective runs inside a measurement.

    Args:
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: cross-entropy of ``module(batch[0])`` against
            ``batch[1]``. (The module's ``training_step`` is not used: it may log and update metrics.)
        every_n_epochs: Measure at the end of every n-th epoch (ignored when ``every_n_steps`` is set).
        every_n_steps: Measure after every n-th optimizer step instead.
        num_batches: Training batches held aside.
        k: Top eigenvalues to log.
        max_iter: Lanczos steps for the eigenvalues.
        tol: Lanczos tolerance.
        trace_probes: Hutchinson probes for the trace (0: no trace).
        rho: ρ of the sharpness; ``None``: the ``SAM`` callback's, or 0.05. 0: no sharpness.
        m: Examples per ε̂ of the sharpness; ``None``: the ``SAM`` callback's ``m`` (or the whole batch).
        adaptive: ASAM's ε̂; ``None``: the ``SAM`` callback's setting (or ``False``).
        spectrum_steps: Lanczos steps of a spectral density kept in ``history`` (0: none).
        measure_at_start: Also measure once at ``on_train_start``, before the first step.
        eval_mode: Measure in eval mode (default); ``False``: train mode (batch statistics; still restored).
        seed: Seed of the probes and start vectors (private generators).

    Raises:
        ValueError: for an argument out of range (at construction).
        MisconfigurationException: at ``setup``, when there is no training dataloader or it has fewer than
            ``num_batches`` batches.

    Example:

        from lightning.pytorch import Trainer
        from lightning_sam import SAM
        from lightning_sam.diagnostics.callback import FlatnessMonitor

        trainer = Trainer(callbacks=[SAM(rho=0.05), FlatnessMonitor(every_n_epochs=1, num_batches=2)])
        trainer.fit(model)  # logs flatness/top_eigenvalue, flatness/trace, flatness/sharpness
    """

    def __init__(
        self,
        loss_fn: Optional[LossFn] = None,
        every_n_epochs: int = 1,
        every_n_steps: Optional[int] = None,
        num_batches: int = 2,
        k: int = 1,
        max_iter: int = 30,
        tol: float = 1e-3,
        trace_probes: int = 20,
        rho: Optional[float] = None,
        m: Optional[int] = None,
        adaptive: Optional[bool] = None,
        spectrum_steps: int = 0,
        measure_at_start: bool = False,
        eval_mode: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be a callable `loss_fn(module, batch) -> scalar`, got {loss_fn!r}.")
        check_int("every_n_epochs", every_n_epochs)
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps)
        check_int("num_batches", num_batches)
        check_int("k", k)
        check_int("max_iter", max_iter)
        if k > max_iter:
            raise ValueError(f"`k`={k} is larger than `max_iter`={max_iter}: Lanczos needs at least k steps.")
        check_positive("tol", tol)
        check_int("trace_probes", trace_probes, minimum=0)
        if rho is not None:
            check_positive("rho", rho, allow_zero=True)
        if m is not None:
            check_int("m", m)
        if adaptive is not None and not isinstance(adaptive, bool):
            raise ValueError(f"`adaptive` must be None or a bool, got {adaptive!r}.")
        check_int("spectrum_steps", spectrum_steps, minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        self.loss_fn = loss_fn or cross_entropy_loss
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.num_batches = num_batches
        self.k = k
        self.max_iter = max_iter
        self.tol = tol
        self.trace_probes = trace_probes
        self.rho = rho
        self.m = m
        self.adaptive = adaptive
        self.spectrum_steps = spectrum_steps
        self.measure_at_start = measure_at_start
        self.eval_mode = eval_mode
        self.seed = seed
        self.batches: Optional[list[Any]] = None
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    # ------------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        batches = self._hold_aside(trainer) if trainer.global_rank == 0 or trainer.world_size == 1 else None
        if trainer.world_size > 1:
            batches = trainer.strategy.broadcast(batches, src=0)
        self.batches = batches

    def _hold_aside(self, trainer: pl.Trainer) -> list[Any]:
        with _all_rngs_preserved():
            try:
                # The source the fit loop itself reads (the `train_dataloaders` given to `fit`, the datamodule or
                # the module), before Lightning wraps it (no DistributedSampler yet). Lightning 2.6 internal.
                loader = trainer.fit_loop._data_source.dataloader()
            except Exception as err:  # no train_dataloader anywhere
                raise MisconfigurationException(
                    f"FlatnessMonitor holds aside training batches at setup but found no training dataloader ({err})."
                ) from err
            if loader is None:
                raise MisconfigurationException("FlatnessMonitor found no training dataloader to hold batches from.")
            batches = []
            for batch in loader:
                batches.append(_detached_copy(batch))
                if len(batches) == self.num_batches:
                    break
        if len(batches) < self.num_batches:
            raise MisconfigurationException(
                f"FlatnessMonitor(num_batches={self.num_batches}) but the training dataloader has only {len(batches)}"
                " batches: lower `num_batches`."
            )
        return batches

    # ------------------------------------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_at_start:
            self.measure(trainer, pl_module, log=False)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self.measure(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module, on_step=False)

    # ---------------------------------------------------------------------------------------------------- measure
    def sharpness_settings(self, trainer: pl.Trainer) -> tuple[float, Optional[int], bool]:
        """``(rho, m, adaptive)`` for the sharpness: the arguments, else the ``SAM`` callback's, else defaults."""
        from lightning_sam.callback import SAM

        sam = next((cb for cb in trainer.callbacks if isinstance(cb, SAM)), None)
        config = sam.config if sam is not None else None
        rho = self.rho if self.rho is not None else (config.rho if config is not None else 0.05)
        m = self.m if self.m is not None else (config.m if config is not None else None)
        adaptive = self.adaptive if self.adaptive is not None else (config.adaptive if config is not None else False)
        return rho, m, adaptive

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool = True, on_step: bool = False
    ) -> dict[str, Any]:
        """Measure now on the held-aside batches (rank 0 computes, broadcasts); log unless ``log=False``."""
        if self.batches is None:
            raise MisconfigurationException("FlatnessMonitor.measure before setup: no batches held aside yet.")
        record = self._compute(trainer, pl_module) if trainer.global_rank == 0 else None
        if trainer.world_size > 1:
            record = trainer.strategy.broadcast(record, src=0)
        assert record is not None
        self.history.append(record)
        if log:
            metrics = {"flatness/top_eigenvalue": record["top_eigenvalue"]}
            metrics.update({f"flatness/eigenvalue_{i}": v for i, v in enumerate(record["eigenvalues"]) if i > 0})
            for key in ("trace", "sharpness"):
                if key in record:
                    metrics[f"flatness/{key}"] = record[key]
            # The same value on every rank (rank 0's, broadcast): no reduction.
            pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=False)
        return record

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        start = time.perf_counter()
        batches = [to_device(b, pl_module.device) for b in self.batches]
        rho, m, adaptive = self.sharpness_settings(trainer)
        common = dict(eval_mode=self.eval_mode)
        record: dict[str, Any] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        with torch.inference_mode(False), torch.enable_grad():
            eigenvalues = hessian_eigenvalues(
                pl_module,
                self.loss_fn,
                batches,
                k=self.k,
                max_iter=self.max_iter,
                tol=self.tol,
                seed=self.seed,
                **common,
            )
            record["eigenvalues"] = eigenvalues.tolist()
            record["top_eigenvalue"] = float(eigenvalues[0])
            if self.trace_probes:
                trace = hessian_trace(
                    pl_module, self.loss_fn, batches, num_probes=self.trace_probes, tol=None, seed=self.seed, **common
                )
                record["trace"], record["trace_std_error"] = trace.trace, trace.std_error
            if rho > 0:
                record["sharpness"] = sharpness(
                    pl_module, self.loss_fn, batches, rho=rho, m=m, adaptive=adaptive, **common
                )
                record["rho"], record["m"] = rho, m
            if self.spectrum_steps:
                record["spectrum"] = hessian_spectrum(
                    pl_module, self.loss_fn, batches, num_steps=self.spectrum_steps, seed=self.seed, **common
                )
        record["seconds"] = time.perf_counter() - start
        return record
