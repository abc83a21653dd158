"""``SAM``: the Trainer-facing face of lightning_sam."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_sam import _lightning
from lightning_sam.config import BatchNormPolicy, SAMConfig
from lightning_sam.distributed import check_strategy, warn_sync_batchnorm
from lightning_sam.optimizer import SAMOptimizer
from lightning_sam.step import SAMCounters, SAMStep

_MATH_SETTINGS = ("rho", "adaptive", "eta", "epsilon")


class SAM(Callback):
    r"""Train an unchanged LightningModule with Sharpness-Aware Minimization (Foret et al., 2020).

    Each optimizer step climbs to the worst point w + ε of a ρ-ball around the weights (ε = ρ·g/‖g‖), takes the
    gradient there, returns to w bit for bit, and lets the module's own optimizer (SGD, AdamW, ...) step with that
    gradient. The module keeps its automatic-optimization ``training_step`` (returning the loss, or a dict with
    ``"loss"``); the callback switches it to manual optimization for the run and runs both passes itself.

    Works with ``precision="32-true"``, ``"bf16-mixed"`` and ``"16-mixed"`` (the fp16 scaler skips a step whose
    first pass overflows), ``Trainer(gradient_clip_val=...)`` (by norm, applied to the final gradient after
    unscaling), ``accumulate_grad_batches``, LR schedulers with their ``interval`` / ``frequency`` / ``monitor``,
    and DDP with ε computed per device (m-sharpness).

    Args:
        rho: Neighbourhood radius ρ (0.05 in the paper). A param group may override it with a ``"rho"`` key.
        adaptive: ASAM (Kwon et al., 2021): ε = ρ·T²g/‖T·g‖ with T = |w| + ``eta``.
        eta: ASAM's offset.
        epsilon: Added to ‖g‖; a zero gradient gives ε = 0.
        interval: SAM on every ``interval``-th optimizer step (by ``trainer.global_step``, so it survives a resume),
            a plain step on the others.
        bn_policy: ``"first"``: BatchNorm running statistics come from the first, unperturbed pass only;
            ``"both"``: both passes update them.
        m: Examples per ε. ``None``: the per-device batch. Smaller: the batch is split into chunks of ``m``, each
            with its own ε and perturbed gradient, averaged by chunk size. Each chunk runs its own two passes.
        log: Log ``sam/perturbed_loss``, ``sam/sharpness`` (L(w+ε) − L(w)) and ``sam/grad_norm`` every step.

    Raises:
        ValueError: at construction, for a setting out of range; at ``setup``, for an unsupported strategy.
        MisconfigurationException: at ``setup``, for ``gradient_clip_algorithm="value"``, a module in manual
            optimization or a second ``SAM`` callback; at ``on_fit_start``, for more than one optimizer.

    Example:

        from lightning.pytorch import Trainer
        from lightning_sam import SAM

        trainer = Trainer(callbacks=[SAM(rho=0.05)], max_epochs=10)
        trainer.fit(model)  # any LightningModule, unchanged
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        epsilon: float = 1e-12,
        interval: int = 1,
        bn_policy: BatchNormPolicy = "first",
        m: Optional[int] = None,
        log: bool = True,
    ) -> None:
        super().__init__()
        self.config = SAMConfig(
            rho=rho, adaptive=adaptive, eta=eta, epsilon=epsilon, interval=interval, bn_policy=bn_policy, m=m, log=log
        )
        self.counters = SAMCounters()
        self._step: Optional[SAMStep] = None
        self._restore_configure_optimizers: Optional[Callable[[], None]] = None

    @classmethod
    def from_config(cls, config: SAMConfig) -> SAM:
        return cls(**config.to_dict())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [cb for cb in trainer.callbacks if isinstance(cb, SAM) and cb is not self]
        if others:
            raise MisconfigurationException(
                "More than one `SAM` callback is on the Trainer (a `SAMModule` adds its own when none is there). Keep"
                " one."
            )
        check_strategy(trainer)
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
            raise MisconfigurationException(
                '`gradient_clip_algorithm="value"` is not supported with SAM: clipping each entry changes the direction'
                ' of the gradient, and so the SAM update. Use `gradient_clip_algorithm="norm"` (the default).'
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "The `SAM` callback runs the SAM step in place of a training_step written for automatic optimization,"
                " but this module sets `automatic_optimization = False`. Let `training_step` return the loss, or drive"
                " `lightning_sam.SAMOptimizer` (first_step / second_step) yourself. (SAM needs exactly one optimizer:"
                " use param groups rather than several optimizers.)"
            )
        self._adopt_module_settings(pl_module)
        self._check_one_optimizer(pl_module)

    def _check_one_optimizer(self, pl_module: pl.LightningModule) -> None:
        """Refuse several optimizers as ``configure_optimizers`` returns them, before Lightning's automatic-mode check
        (which would advise manual optimization, the one thing the SAM callback cannot take)."""
        configured = pl_module.configure_optimizers
        previous = pl_module.__dict__.get("configure_optimizers")  # e.g. LightningCLI's, kept as it was

        def restore() -> None:
            if pl_module.__dict__.get("configure_optimizers") is configure_optimizers:
                if previous is None:
                    del pl_module.__dict__["configure_optimizers"]
                else:
                    pl_module.configure_optimizers = previous

        def configure_optimizers() -> Any:
            restore()
            result = configured()
            count = _lightning.count_optimizers(result)
            if count != 1:
                raise MisconfigurationException(
                    f"SAM needs exactly one optimizer, but `configure_optimizers` returned {count}. Put all"
                    " parameters in one optimizer (use param groups for different settings)."
                )
            return result

        pl_module.configure_optimizers = configure_optimizers
        self._restore_configure_optimizers = restore  # in case the fit stops before optimizers are configured

    def _adopt_module_settings(self, pl_module: pl.LightningModule) -> None:
        from lightning_sam.module import SAMModule

        if not isinstance(pl_module, SAMModule) or pl_module.sam_config == self.config:
            return
        if pl_module.sam_config == SAMConfig():
            return  # the module leaves the settings to the callback
        if self.config != SAMConfig():
            conflicts = ", ".join(
                f"{k}: module {a!r} vs callback {b!r}" for k, (a, b) in pl_module.sam_config.diff(self.config).items()
            )
            raise MisconfigurationException(
                f"`{type(pl_module).__name__}` (a SAMModule) and the `SAM` callback set different SAM settings"
                f" ({conflicts}). Configure SAM in one place."
            )
        self.config = pl_module.sam_config

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"SAM needs exactly one optimizer, but `configure_optimizers` returned {len(trainer.optimizers)}."
                " Put all parameters in one optimizer (use param groups for different settings)."
            )
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, SAMOptimizer):
            changed = {k: v for k, v in self.config.diff(SAMConfig()).items() if k in _MATH_SETTINGS}
            clashes = {k for k in changed if getattr(optimizer.config, k) != getattr(self.config, k)}
            if clashes:
                raise MisconfigurationException(
                    f"The SAMOptimizer and the `SAM` callback both set {sorted(clashes)} differently. Set them on one."
                )
        warn_sync_batchnorm(trainer, pl_module)
        self._step = SAMStep(self.config, self.counters)
        self._step.install(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Loop state is restored by now: a checkpoint written without SAM counted its steps in the automatic counter.
        _lightning.adopt_automatic_step_count(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips `teardown` after an exception: give the module back all the same.
        self._uninstall()

    def _uninstall(self) -> None:
        if self._restore_configure_optimizers is not None:
            self._restore_configure_optimizers()
            self._restore_configure_optimizers = None
        if self._step is not None:
            self._step.uninstall()
            self._step = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), **self.counters.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counters.load_state_dict(state_dict)
        saved = SAMConfig.from_dict(state_dict.get("config", {}))
        if saved != self.config:
            rank_zero_warn(
                f"Resuming with SAM settings that differ from the checkpoint's: {saved.diff(self.config)}"
                " (checkpoint, now). The current settings are used."
            )
