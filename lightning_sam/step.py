"""The one Lightning SAM step, shared by the ``SAM`` callback and ``SAMModule``.

Per optimizer step, with the module in manual optimization:

    zero_grad                                   (once per accumulation window)
    for each micro-batch (and each m-chunk of it):
        forward 1 at w                          -> the loss that is logged; BatchNorm statistics updated
        backward 1, local (no all-reduce)       -> g, into fresh .grad buffers
        ε from g, w -> w + ε                    (perturbation.perturb_; the accumulated .grad is put back)
        forward 2 at w + ε                      (BatchNorm statistics frozen, self.log and metrics silenced)
        backward 2, all-reduced on the last micro-batch / chunk, into the accumulated .grad
        w + ε -> w, bit for bit                 (also on an exception, so no perturbed weights are ever saved)
    optimizer.step()                            (precision plugin: unscale, on_before_optimizer_step, clip, step)
    step-interval schedulers

The user's ``training_step`` is called as it is, once per pass. Under the fp16 ``GradScaler`` the first-pass
gradients stay scaled (ε is scale-invariant); a non-finite norm gives ε = 0 and poisons the second loss with NaN, so
that the scaler skips the step (on every rank, as the NaN is all-reduced). Nothing here reads a device value on the
host.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchmetrics import Metric

from lightning_sam import _lightning
from lightning_sam.batchnorm import frozen_running_stats
from lightning_sam.chunks import batch_size, split_batch
from lightning_sam.config import SAMConfig
from lightning_sam.distributed import gradient_sync
from lightning_sam.optimizer import SAMOptimizer
from lightning_sam.perturbation import groups_from_optimizer, perturb_, restore_
from lightning_sam.schedulers import step_schedulers


@dataclass
class SAMCounters:
    """What a checkpoint keeps of the SAM step besides its settings."""

    sam_steps: int = 0
    plain_steps: int = 0
    nonfinite_skips: Any = 0
    """Perturbations skipped for a non-finite gradient norm; a device tensor between checkpoints (no host sync)."""

    def state_dict(self) -> dict[str, int]:
        return {
            "sam_steps": self.sam_steps,
            "plain_steps": self.plain_steps,
            "nonfinite_skips": int(self.nonfinite_skips),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sam_steps = int(state.get("sam_steps", 0))
        self.plain_steps = int(state.get("plain_steps", 0))
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))


@dataclass
class _PassStats:
    loss: Tensor
    perturbed_loss: Tensor
    grad_norm: Tensor


class SAMStep:
    """Runs SAM inside a LightningModule in manual optimization; installed and removed by the ``SAM`` callback."""

    def __init__(self, config: SAMConfig, counters: SAMCounters) -> None:
        self.config = config
        self.counters = counters
        self._trainer: Optional[pl.Trainer] = None
        self._module: Optional[pl.LightningModule] = None
        self._user: dict[str, Callable[..., Any]] = {}
        self._metrics: list[Metric] = []
        self._window_open = False

    # ------------------------------------------------------------------ installation
    def install(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Switch ``module`` to manual optimization with the SAM step as its ``training_step``.

        Called at ``on_fit_start``: after ``configure_optimizers`` ran in automatic mode (so scheduler configs keep
        ``interval``/``monitor``) and after Lightning validated the Trainer flags that manual mode would refuse.
        """
        self._trainer, self._module = trainer, module
        self._metrics = [m for m in module.modules() if isinstance(m, Metric)]
        self._window_open = False
        module.automatic_optimization = False
        # Instance attributes shadow the class's methods, so the user's classes stay as they are; Lightning (and
        # DDP's forward redirection) look the hooks up on the instance.
        hooks = {
            "training_step": self.training_step,
            "on_before_optimizer_step": self._on_before_optimizer_step,
            "on_train_epoch_end": self._on_train_epoch_end,
        }
        for name, hook in hooks.items():
            self._user[name] = getattr(module, name)
            setattr(module, name, hook)

    def uninstall(self) -> None:
        """Give the module back as it was: automatic optimization, its own hooks, the step count carried over."""
        module, trainer = self._module, self._trainer
        if module is None or trainer is None:
            return
        for name in self._user:
            module.__dict__.pop(name, None)
        self._user = {}
        module.automatic_optimization = True
        _lightning.carry_manual_step_count(trainer)
        self._module = self._trainer = None

    # ------------------------------------------------------------------ hooks
    def _on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradients are unscaled here under every precision. As in automatic optimization: the user's hook, then
        # `configure_gradient_clipping` (which clips by the Trainer's norm unless the module overrides it).
        self._user["on_before_optimizer_step"](optimizer)
        self._module.configure_gradient_clipping(
            optimizer,
            gradient_clip_val=self._trainer.gradient_clip_val,
            gradient_clip_algorithm=self._trainer.gradient_clip_algorithm,
        )

    def _on_train_epoch_end(self) -> None:
        # Plateau schedulers step after the module's own epoch-end hook, which may log their monitor.
        self._user["on_train_epoch_end"]()
        if _lightning.epoch_batches_done(self._trainer):
            step_schedulers(self._trainer, "epoch", plateau=True)

    # ------------------------------------------------------------------ the step
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        trainer, module = self._trainer, self._module
        optimizer = module.optimizers()
        raw = optimizer.optimizer
        if not self._window_open:
            optimizer.zero_grad()
            self._window_open = True
        take_step = not _lightning.should_accumulate(trainer)
        # Lightning divides the loss by the window length under automatic accumulation: so does this step.
        weight = 1.0 / trainer.accumulate_grad_batches
        sam_now = trainer.global_step % self.config.interval == 0
        if sam_now:
            output, stats = self._sam_backward(raw, args, kwargs, weight, sync=take_step)
        else:
            output, stats = self._plain_backward(args, kwargs, weight, sync=take_step), None
        if take_step:
            with raw._delegating() if isinstance(raw, SAMOptimizer) else nullcontext():
                optimizer.step()
            self._window_open = False
            if sam_now:
                self.counters.sam_steps += 1
            else:
                self.counters.plain_steps += 1
            # Both step counters agree at every step, so checkpoints resume with or without SAM.
            _lightning.carry_manual_step_count(trainer)
            step_schedulers(trainer, "step")
            if _lightning.epoch_batches_done(trainer):
                # As in automatic optimization: right after the epoch's last step, before checkpoints are written.
                step_schedulers(trainer, "epoch", plateau=False)
        if stats is not None:
            self._log(stats)
        return output

    def _plain_backward(self, args: tuple, kwargs: dict, weight: float, sync: bool) -> Any:
        output = self._user["training_step"](*args, **kwargs)
        loss = _loss_of(output)
        if loss is None:
            _lightning.check_world_size_for_skip(self._trainer)
            return None
        with gradient_sync(self._trainer, sync):
            self._module.manual_backward(loss * weight if weight != 1.0 else loss)
        return output

    def _sam_backward(self, raw: torch.optim.Optimizer, args: tuple, kwargs: dict, weight: float, sync: bool):
        batch, rest = args[0], args[1:]
        chunks = split_batch(batch, self.config.m) if self.config.m is not None else [(batch, None)]
        total = batch_size(batch) if len(chunks) > 1 else None
        params = [p for group in raw.param_groups for p in group["params"]]
        groups = groups_from_optimizer(raw.param_groups, self._sam_settings(raw))
        epsilon = raw.epsilon if isinstance(raw, SAMOptimizer) else self.config.epsilon
        scaler = _lightning.loss_scaler(self._trainer)

        losses, perturbed_losses, norms, output = [], [], [], None
        for index, (chunk, size) in enumerate(chunks):
            share = 1.0 if total is None else size / total
            output = self._user["training_step"](chunk, *rest, **kwargs)
            loss = _loss_of(output)
            if loss is None:
                _lightning.check_world_size_for_skip(self._trainer)
                return None, None
            # The first backward goes into fresh .grad buffers, so ε sees this micro-batch alone; what the window
            # accumulated so far is kept aside and put back before the second backward adds to it.
            accumulated = [p.grad for p in params]
            for p in params:
                p.grad = None
            with gradient_sync(self._trainer, False):
                self._module.manual_backward(loss)
            perturbation = perturb_(groups, epsilon, guard_nonfinite=scaler is not None)
            for p, grad in zip(params, accumulated):
                p.grad = grad
            torch.clear_autocast_cache()  # autocast caches casts by tensor identity, blind to in-place changes
            try:
                with self._second_pass_context():
                    perturbed_output = self._user["training_step"](chunk, *rest, **kwargs)
                perturbed_loss = _loss_of(perturbed_output)
                if perturbed_loss is None:
                    raise MisconfigurationException(
                        "`training_step` returned a loss at w but None at w + ε (the second SAM pass). It must make the"
                        " same decision in both passes."
                    )
                factor: Any = weight * share
                if scaler is not None and perturbation is not None:
                    # An fp16 overflow in the first pass: ε was 0; a NaN gradient makes the scaler skip this step.
                    factor = torch.where(perturbation.finite, factor, math.nan)
                if isinstance(factor, Tensor) or factor != 1.0:
                    perturbed_loss = perturbed_loss * factor
                last = index == len(chunks) - 1
                with gradient_sync(self._trainer, sync and last):
                    self._module.manual_backward(perturbed_loss)
            finally:
                if perturbation is not None:
                    restore_(perturbation)
                torch.clear_autocast_cache()
            losses.append(loss.detach() * share)
            perturbed_losses.append(_loss_of(perturbed_output).detach() * share)
            if perturbation is not None:
                norms.append(perturbation.grad_norm * share)
                self.counters.nonfinite_skips = self.counters.nonfinite_skips + (~perturbation.finite).int()
        norm = torch.stack(norms).sum() if norms else None
        stats = _PassStats(
            loss=torch.stack(losses).sum(), perturbed_loss=torch.stack(perturbed_losses).sum(), grad_norm=norm
        )
        if scaler is not None and norm is not None:
            scale = _lightning.scale_tensor(scaler)
            if scale is not None:
                stats.grad_norm = norm / scale
        if len(chunks) > 1:
            output = _with_loss(output, stats.loss)
        return output, stats

    def _sam_settings(self, raw: torch.optim.Optimizer) -> SAMConfig:
        return raw.config if isinstance(raw, SAMOptimizer) else self.config

    @contextmanager
    def _second_pass_context(self) -> Iterator[None]:
        with ExitStack() as stack:
            if self.config.bn_policy == "first":
                stack.enter_context(frozen_running_stats(self._module))
            stack.enter_context(_silenced(self._module, self._metrics))
            yield

    def _log(self, stats: _PassStats) -> None:
        if not self.config.log:
            return
        log = self._module.log
        kwargs = dict(on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        log("sam/perturbed_loss", stats.perturbed_loss, **kwargs)
        log("sam/sharpness", stats.perturbed_loss - stats.loss, **kwargs)
        if stats.grad_norm is not None:
            log("sam/grad_norm", stats.grad_norm, **kwargs)


def _loss_of(output: Any) -> Optional[Tensor]:
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise MisconfigurationException(
        "With SAM, `training_step` must return the loss as a tensor, a dict with a 'loss' key, or None to skip the"
        f" batch; got {type(output).__name__}."
    )


def _with_loss(output: Any, loss: Tensor) -> Any:
    if isinstance(output, Mapping):
        return {**output, "loss": loss}
    return loss


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _silenced(module: pl.LightningModule, metrics: list[Metric]) -> Iterator[None]:
    """The second pass leaves no trace: ``self.log`` / ``self.log_dict`` do nothing and torchmetrics keep their state.

    The user's ``training_step`` runs twice per SAM step, but its logs and metric updates must describe the model at
    w, not at w + ε.
    """
    saved = [(metric, _metric_state(metric)) for metric in metrics]
    module.log, module.log_dict = _ignore, _ignore
    try:
        yield
    finally:
        del module.log, module.log_dict
        for metric, state in saved:
            _load_metric_state(metric, state)


def _metric_state(metric: Metric) -> dict[str, Any]:
    state = {
        name: value.clone() if isinstance(value, Tensor) else list(value)
        for name, value in ((name, getattr(metric, name)) for name in metric._defaults)
    }
    state["_update_count"] = metric._update_count
    state["_computed"] = metric._computed
    state["_forward_cache"] = metric._forward_cache
    return state


def _load_metric_state(metric: Metric, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(metric, name, value)
