"""``SAM``: the Trainer-facing face of lightning_sam."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_sam import _lightning
from lightning_sam.config import BatchNormPolicy, SAMConfig, validate_param_groups
from lightning_sam.distributed import check_strategy, warn_sync_batchnorm
from lightning_sam.perturbation import check_parameters
from lightning_sam.optimizer import SAMOptimizer
from lightning_sam.patching import Patcher
from lightning_sam.step import SAMCounters, SAMPasses
from lightning_sam.training_step import AutomaticSAMStep, ManualSAMStep
from lightning_sam.variants import Variant
from lightning_sam.variants.binding import (
    bind_variant,
    check_variant,
    is_default,
    load_variant_state,
    variant_state,
)

_MATH_SETTINGS = ("rho", "adaptive", "eta", "epsilon")


class SAM(Callback):
    r"""Train an unchanged LightningModule with Sharpness-Aware Minimization (Foret et al., 2020).

    Each optimizer step climbs to the worst point w + ε of a ρ-ball around the weights (ε = ρ·g/‖g‖), takes the
    gradient there, returns to w bit for bit, and lets the module's own optimizer (SGD, AdamW, ...) step with that
    gradient. The module stays as it is, in automatic optimization, with its ``training_step`` (returning the loss,
    or a dict with ``"loss"``): the callback runs both passes inside the strategy's ``training_step`` and hands
    Lightning one loss whose value is the loss at w and whose backward gives the gradient at w + ε. Lightning's own
    loop then does everything else as without SAM: precision and the fp16 scaler (a step whose first pass overflows
    is skipped), zero-grad and backward hooks, ``accumulate_grad_batches`` and ``GradientAccumulationScheduler``,
    ``gradient_clip_val`` (by norm, on the final gradient after unscaling), the module's ``optimizer_step`` and
    ``optimizer_zero_grad`` overrides, LR schedulers, checkpoints, SWA, and DDP's single all-reduce (ε stays
    per device: m-sharpness). A ``SAMModule`` is run in manual optimization instead (see there).

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
        variant: A SAM variant from ``lightning_sam.variants`` (``LookSAM(k=5)``, ``RandomSAM(p=0.5)``, ``AESAM()``,
            ``MSAM()``, ``ESAM()``, ``ASAM()``); ``None`` is plain SAM (ASAM with ``adaptive=True``). Its state is
            saved in the callback's checkpoint state.
        same_randomness: Replay the first pass's RNG state in the second pass (same dropout masks at w and w + ε).

    Raises:
        ValueError: at construction, for a setting out of range; at ``setup``, for an unsupported strategy.
        MisconfigurationException: at ``setup``, for ``gradient_clip_algorithm="value"``, a module in manual
            optimization, a ``training_step`` that takes ``dataloader_iter`` or a second ``SAM`` callback; when
            ``configure_optimizers`` returns, for more than one optimizer; at ``on_fit_start``, for a param group
            with a bad ``rho`` / ``adaptive`` / ``eta``.

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
        variant: Optional[Variant] = None,
        same_randomness: bool = False,
    ) -> None:
        super().__init__()
        self.config = SAMConfig(
            rho=rho,
            adaptive=adaptive,
            eta=eta,
            epsilon=epsilon,
            interval=interval,
            bn_policy=bn_policy,
            m=m,
            log=log,
            same_randomness=same_randomness,
        )
        self.variant = check_variant(variant, self.config)
        self.counters = SAMCounters()
        self._step: Optional[Union[AutomaticSAMStep, ManualSAMStep]] = None
        self._patcher = Patcher()
        self._configure_patch = Patcher()

    @classmethod
    def from_config(cls, config: SAMConfig, variant: Optional[Variant] = None) -> SAM:
        return cls(**config.to_dict(), variant=variant)

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
        _lightning.check_tuner_callbacks(trainer)
        if _lightning.takes_dataloader_iter(pl_module):
            raise MisconfigurationException(
                "`training_step(self, dataloader_iter)` cannot be used with SAM: SAM calls `training_step` twice per"
                " step (at w and at w + ε), and the second call would pull another batch. Take `batch` (and"
                " optionally `batch_idx`) instead."
            )
        self._adopt_module_settings(pl_module)
        if _manual(pl_module):
            _lightning.check_manual_optimization_features(trainer, type(pl_module).__name__)
        self._check_one_optimizer(pl_module)

    def _check_one_optimizer(self, pl_module: pl.LightningModule) -> None:
        """Refuse several optimizers as ``configure_optimizers`` returns them, before Lightning's automatic-mode check
        (which would advise manual optimization, the one thing the SAM callback cannot take)."""
        self._configure_patch.set(pl_module, "configure_optimizers", _OneOptimizer(pl_module.configure_optimizers))

    def _adopt_module_settings(self, pl_module: pl.LightningModule) -> None:
        module_variant = getattr(pl_module, "sam_variant", None)
        if isinstance(module_variant, Variant) and module_variant is not self.variant:
            if not is_default(module_variant) and not is_default(self.variant):
                raise MisconfigurationException(
                    f"`{type(pl_module).__name__}` (a SAMModule) and the `SAM` callback both set a variant"
                    f" ({module_variant!r} and {self.variant!r}). Configure SAM in one place."
                )
            if not is_default(module_variant):
                self.variant = module_variant
        module_config = getattr(pl_module, "sam_config", None)
        if not isinstance(module_config, SAMConfig) or module_config == self.config:
            return
        if module_config == SAMConfig():
            return  # the module leaves the settings to the callback
        if self.config != SAMConfig():
            conflicts = ", ".join(
                f"{k}: module {a!r} vs callback {b!r}" for k, (a, b) in module_config.diff(self.config).items()
            )
            raise MisconfigurationException(
                f"`{type(pl_module).__name__}` (a SAMModule) and the `SAM` callback set different SAM settings"
                f" ({conflicts}). Configure SAM in one place."
            )
        self.config = module_config

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._configure_patch.restore()  # `configure_optimizers` has run (unless the fit stopped before)
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"SAM needs exactly one optimizer, but `configure_optimizers` returned {len(trainer.optimizers)}."
                " Put all parameters in one optimizer (use param groups for different settings)."
            )
        optimizer = trainer.optimizers[0]
        math = self.config
        if isinstance(optimizer, SAMOptimizer):
            changed = {k: v for k, v in self.config.diff(SAMConfig()).items() if k in _MATH_SETTINGS}
            clashes = {k for k in changed if getattr(optimizer.config, k) != getattr(self.config, k)}
            if clashes:
                raise MisconfigurationException(
                    f"The SAMOptimizer and the `SAM` callback both set {sorted(clashes)} differently. Set them on one."
                )
            math = SAMConfig(**{**self.config.to_dict(), **{k: getattr(optimizer.config, k) for k in _MATH_SETTINGS}})
            if not is_default(optimizer.variant):
                if not is_default(self.variant) and optimizer.variant is not self.variant:
                    raise MisconfigurationException(
                        f"The SAMOptimizer and the `SAM` callback both set a variant ({optimizer.variant!r} and"
                        f" {self.variant!r}). Set it on one."
                    )
                self.variant = optimizer.variant
            # Lightning calls `step` as for any optimizer; the passes are run here.
            self._patcher.set(optimizer, "base_steps_only", True)
        if getattr(self, "_saved_variant", None) is not None:
            load_variant_state(self.variant, self._saved_variant)
            self._saved_variant = None
        validate_param_groups(optimizer.param_groups, math)
        check_parameters(pl_module)
        bind_variant(self.variant, optimizer, math, trainer.world_size)
        self.variant.bind_model(pl_module)
        warn_sync_batchnorm(trainer, pl_module)
        passes = SAMPasses(math, self.counters, optimizer, self.variant)
        step_class = ManualSAMStep if _manual(pl_module) else AutomaticSAMStep
        self._step = step_class(trainer, pl_module, passes, math)
        self._step.install()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self._step, ManualSAMStep):
            # Loop state is restored by now: a checkpoint written without SAM counted its steps in the automatic
            # counter.
            _lightning.adopt_automatic_step_count(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips `teardown` after an exception: give the module back all the same.
        self._uninstall()

    def _uninstall(self) -> None:
        if self._step is not None:
            self._step.uninstall()
            self._step = None
        self._patcher.restore()
        self._configure_patch.restore()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            **self.counters.state_dict(),
            "variant": variant_state(self.variant),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counters.load_state_dict(state_dict)
        # Loaded at `on_fit_start`, once the variant is known (it may come from a SAMOptimizer or a SAMModule).
        self._saved_variant = state_dict.get("variant")
        saved = SAMConfig.from_dict(state_dict.get("config", {}))
        if saved != self.config:
            rank_zero_warn(
                f"Resuming with SAM settings that differ from the checkpoint's: {saved.diff(self.config)}"
                " (checkpoint, now). The current settings are used."
            )


class _OneOptimizer:
    """Stands in for the module's ``configure_optimizers`` from ``setup`` until ``on_fit_start``: the same result,
    checked to hold one optimizer. A plain object (not a closure), so the module can be pickled or copied meanwhile."""

    def __init__(self, configure_optimizers: Any) -> None:
        self.configure_optimizers = configure_optimizers

    def __call__(self) -> Any:
        result = self.configure_optimizers()
        count = _lightning.count_optimizers(result)
        if count != 1:
            raise MisconfigurationException(
                f"SAM needs exactly one optimizer, but `configure_optimizers` returned {count}. Put all"
                " parameters in one optimizer (use param groups for different settings)."
            )
        return result


def _manual(pl_module: pl.LightningModule) -> bool:
    """``SAMModule`` trains in manual optimization; every other module keeps automatic optimization."""
    return bool(getattr(pl_module, "sam_manual_optimization", False))
