"""``SAMModule``: SAM for a LightningModule by inheritance."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_sam.callback import SAM
from lightning_sam.config import BatchNormPolicy, SAMConfig
from lightning_sam.variants import Variant
from lightning_sam.variants.binding import check_variant


class SAMModule(pl.LightningModule):
    """A LightningModule mixin that trains with Sharpness-Aware Minimization.

    Write ``training_step`` as for automatic optimization (return the loss). For the fit, the module switches to
    manual optimization and runs both SAM passes through the same code as the ``SAM`` callback. Each step calls the
    module's ``optimizer_zero_grad`` and ``optimizer_step`` hooks (with a closure, so overrides such as an LR
    warm-up run as usual), and Lightning clips (``gradient_clip_val``, by norm, after unscaling) and steps the LR
    schedulers at its usual points. Precision, ``accumulate_grad_batches`` and DDP work as with the callback.

    Lightning 2.6 does not run two features for a module in manual optimization: ``GradientAccumulationScheduler``
    and ``ModelCheckpoint(train_time_interval=...)``. They are refused at setup; the ``SAM`` callback on the same
    module without this base supports both.

    The settings come from the constructor; a ``SAM`` callback on the Trainer takes over when the module keeps the
    defaults, and a callback with different settings is an error.

    It works as the only base and as a mixin in front of an existing module.

    Args:
        *args: Passed on to the next class in the MRO (for ``class Net(SAMModule, MyExistingModule)``).
        rho: Neighbourhood radius, as for ``SAM``.
        adaptive: ASAM, as for ``SAM``.
        eta: ASAM's offset, as for ``SAM``.
        epsilon: Added to the gradient norm, as for ``SAM``.
        interval: SAM on every ``interval``-th optimizer step, as for ``SAM``.
        bn_policy: BatchNorm statistics from the ``"first"`` pass or ``"both"``, as for ``SAM``.
        m: Examples per ε, as for ``SAM``.
        log_sam: Log the ``sam/*`` metrics (the callback's ``log``).
        variant: A SAM variant from ``lightning_sam.variants``, as for ``SAM``.
        same_randomness: Replay the first pass's RNG state in the second pass, as for ``SAM``.
        **kwargs: Passed on to the next class in the MRO.

    Example:

        class Net(SAMModule):
            def __init__(self):
                super().__init__(rho=0.05)
                self.layer = torch.nn.Linear(32, 2)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self.layer(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        class SAMResNet(SAMModule, MyResNetModule):  # an existing module, unchanged
            pass
    """

    sam_manual_optimization = True
    """Read by the ``SAM`` callback: this module trains in manual optimization."""

    def __init__(
        self,
        *args: Any,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        epsilon: float = 1e-12,
        interval: int = 1,
        bn_policy: BatchNormPolicy = "first",
        m: Optional[int] = None,
        log_sam: bool = True,
        variant: Optional[Variant] = None,
        same_randomness: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sam_config = SAMConfig(
            rho=rho,
            adaptive=adaptive,
            eta=eta,
            epsilon=epsilon,
            interval=interval,
            bn_policy=bn_policy,
            m=m,
            log=log_sam,
            same_randomness=same_randomness,
        )
        self.sam_variant = check_variant(variant, self.sam_config)
        # An instance attribute, so that a subclass that overrides `configure_callbacks` still gets its SAM step.
        self.configure_callbacks = self._configure_callbacks_with_sam

    def _configure_callbacks_with_sam(self) -> list[Callback]:
        callbacks = type(self).configure_callbacks(self)
        if isinstance(callbacks, Callback):
            callbacks = [callbacks]
        callbacks = list(callbacks or [])
        on_trainer = self._trainer is not None and any(isinstance(cb, SAM) for cb in self._trainer.callbacks)
        if not on_trainer and not any(isinstance(cb, SAM) for cb in callbacks):
            callbacks.append(SAM.from_config(self.sam_config, self.sam_variant))
        return callbacks
