"""Sharpness-Aware Minimization for PyTorch Lightning: a callback, a mixin module and an optimizer wrapper."""

from lightning_sam.callback import SAM
from lightning_sam.config import SAMConfig
from lightning_sam.module import SAMModule
from lightning_sam.optimizer import SAMOptimizer
from lightning_sam.perturbation import PerturbGroup, Perturbation, perturb_, restore_

__version__ = "0.1.0"

__all__ = ["SAM", "SAMConfig", "SAMModule", "SAMOptimizer", "PerturbGroup", "Perturbation", "perturb_", "restore_"]
