"""The RNG state of this process (CPU and every initialised CUDA device), to replay a pass's randomness."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

RNGState = tuple[Tensor, Optional[list[Tensor]]]


def get_rng_state() -> RNGState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: RNGState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
