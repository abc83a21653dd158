"""BatchNorm policy: keep the running statistics of the unperturbed pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, no ``_BatchNorm`` layer of ``module`` updates its running statistics.

    In training mode a layer with ``track_running_stats=False`` normalises with the batch statistics, exactly as
    before, but neither touches ``running_mean`` / ``running_var`` nor counts ``num_batches_tracked``. Turning the
    flag off is therefore a freeze for every momentum, ``momentum=None`` (cumulative average) included, and for
    every ``_BatchNorm`` kind (1d/2d/3d, lazy, SyncBatchNorm), with no copy of the statistics. The state of other
    layers is replayed instead (``layer_state_buffers``).
    """
    batch_norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for layer in batch_norms:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in batch_norms:
            layer.track_running_stats = True


def layer_state_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The buffers of ``module`` other than BatchNorm statistics: state that forwards may update whatever a flag
    says (InstanceNorm with running statistics, spectral norm's power-iteration vectors, custom running averages)."""
    batch_norm = {id(b) for m in module.modules() if isinstance(m, _BatchNorm) for b in m.buffers(recurse=False)}
    return [b for b in module.buffers() if id(b) not in batch_norm]


def has_sync_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
