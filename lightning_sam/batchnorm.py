"""BatchNorm policy: keep the running statistics of the unperturbed pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, no ``_BatchNorm`` layer of ``module`` updates its running statistics.

    In training mode a layer with ``track_running_stats=False`` normalises with the batch statistics, exactly as
    before, but neither touches ``running_mean`` / ``running_var`` nor counts ``num_batches_tracked``. Turning the
    flag off is therefore a freeze for every momentum, ``momentum=None`` (cumulative average) included, and for
    every ``_BatchNorm`` kind (1d/2d/3d, lazy, SyncBatchNorm), with no copy of the statistics. InstanceNorm layers
    that track running statistics get theirs back from a copy.
    """
    tracking = [m for m in module.modules() if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.training]
    tracking = [m for m in tracking if m.track_running_stats]
    batch_norms = [m for m in tracking if isinstance(m, _BatchNorm)]
    # InstanceNorm updates the buffers it is given whatever the flag says: keep a copy and put it back instead.
    saved = [(m, [b.clone() for b in m.buffers(recurse=False)]) for m in tracking if isinstance(m, _InstanceNorm)]
    for layer in batch_norms:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in batch_norms:
            layer.track_running_stats = True
        with torch.no_grad():
            for layer, copies in saved:
                for buffer, copy in zip(layer.buffers(recurse=False), copies):
                    buffer.copy_(copy)


def has_sync_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
