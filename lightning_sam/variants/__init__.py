"""SAM variants, each a small object that the one SAM engine runs in every face (``variant=`` of ``SAM``,
``SAMModule`` and ``SAMOptimizer``; ``class_path: lightning_sam.variants.LookSAM`` in LightningCLI YAML).

Cost per step, in forward-backward passes (SGD = 1), and extra memory in parameter-sized buffers (beyond SAM's copy
of w):

| variant | passes | extra buffers |
|---|---|---|
| ``SAM()`` (plain SAM; ASAM where the settings say ``adaptive``) | 2 | 0 |
| ``ASAM(eta)`` | 2 | 0 |
| ``LookSAM(k, alpha)`` | 1 + 1/k | 1 (g_v) + 1 on SAM steps (g) |
| ``AESAM(c, ...)`` | 1 + share of SAM steps | 0 |
| ``RandomSAM(p)`` | 1 + p | 0 |
| ``MSAM()`` | 1 | 0 |
| ``ESAM(beta, gamma)`` | < 2 (see its docstring) | 0 |
| ``GSAM(alpha, rho_max, rho_min)`` | 2 | 1 (g, during the step) |
| ``FriendlySAM(sigma, lmbda)`` | 2 | 1 (the EMA m) |
| ``SAMON(selection)`` | < 2 (first backward: selected weights only) | 0 |

Any variant that takes ``rho_schedule`` accepts a ``RhoSchedule`` (``ConstantRho``, ``LinearRho``, ``CosineRho``,
``LRTiedRho``).
"""

from lightning_sam.variants.aesam import AESAM
from lightning_sam.variants.base import ASAM, SAM, Variant
from lightning_sam.variants.esam import ESAM
from lightning_sam.variants.friendly import FriendlySAM
from lightning_sam.variants.gsam import GSAM
from lightning_sam.variants.looksam import LookSAM
from lightning_sam.variants.msam import MSAM
from lightning_sam.variants.random_sam import RandomSAM
from lightning_sam.variants.schedules import ConstantRho, CosineRho, LinearRho, LRTiedRho, RhoSchedule
from lightning_sam.variants.selection import SAMON, ParamSelection

__all__ = [
    "AESAM",
    "ASAM",
    "ConstantRho",
    "CosineRho",
    "ESAM",
    "FriendlySAM",
    "GSAM",
    "LRTiedRho",
    "LinearRho",
    "LookSAM",
    "MSAM",
    "ParamSelection",
    "RandomSAM",
    "RhoSchedule",
    "SAM",
    "SAMON",
    "Variant",
]
