"""LR schedulers under the SAM step, stepped as automatic optimization steps them.

Lightning does not step schedulers in manual optimization. The SAM step switches to manual optimization only after
``configure_optimizers`` has run in automatic mode, so ``trainer.lr_scheduler_configs`` still hold ``interval``,
``frequency``, ``monitor`` and ``strict``; this module honours them with Lightning's own rules.
"""

from __future__ import annotations

from typing import Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sam import _lightning


def step_schedulers(trainer: pl.Trainer, interval: Literal["step", "epoch"], plateau: Optional[bool] = None) -> None:
    """Step the schedulers whose ``interval`` is ``interval`` and whose ``frequency`` divides the current index.

    The index is the batch index + 1 for ``"step"`` and the epoch + 1 for ``"epoch"``, as in Lightning's automatic
    optimization. ``ReduceLROnPlateau`` receives the value of its ``monitor`` from ``trainer.callback_metrics``.
    ``plateau`` restricts the call to plateau (True) or other (False) schedulers; None steps both.
    """
    module = trainer.lightning_module
    index = (_lightning.batch_idx(trainer) if interval == "step" else trainer.current_epoch) + 1
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval or index % config.frequency != 0:
            continue
        if plateau is not None and config.reduce_on_plateau != plateau:
            continue
        monitor_val = None
        if config.reduce_on_plateau:
            monitor_val = trainer.callback_metrics.get(config.monitor)
            if monitor_val is None:
                if config.strict:
                    raise MisconfigurationException(
                        f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available. Available"
                        f" metrics are: {list(trainer.callback_metrics)}. Condition can be set using `monitor` key in"
                        " lr scheduler dict"
                    )
                rank_zero_warn(
                    f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available but strict is"
                    " set to `False`. Skipping learning rate update.",
                    category=RuntimeWarning,
                )
                continue
        _lightning.lr_scheduler_step(trainer, module, config, monitor_val)
