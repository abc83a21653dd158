"""BatchNorm policy: keep the running statistics of the unperturbed pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, no layer of ``module`` changes its state: BatchNorm statistics and every other buffer.

    In training mode a ``_BatchNorm`` layer with ``track_running_stats=False`` normalises with the batch statistics,
    exactly as before, but neither touches ``running_mean`` / ``running_var`` nor counts ``num_batches_tracked``.
    Turning the flag off is therefore a freeze for every momentum, ``momentum=None`` (cumulative average) included,
    and for every ``_BatchNorm`` kind (1d/2d/3d, lazy, SyncBatchNorm), with no copy of the statistics.

    Other layers keep state in buffers that their forward updates whatever a flag says (InstanceNorm with running
    statistics, spectral norm's power-iteration vectors, custom running averages): those buffers are copied and put
    back (usually a few small tensors).
    """
    batch_norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    frozen = {id(b) for m in module.modules() if isinstance(m, _BatchNorm) for b in m.buffers(recurse=False)}
    others = [b for b in module.buffers() if id(b) not in frozen]
    copies = [b.clone() for b in others]
    for layer in batch_norms:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in batch_norms:
            layer.track_running_stats = True
        with torch.no_grad():
            for buffer, copy in zip(others, copies):
                buffer.copy_(copy)


def has_sync_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
