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
"""

from lightning_sam.variants.aesam import AESAM
from lightning_sam.variants.base import ASAM, SAM, Variant
from lightning_sam.variants.esam import ESAM
from lightning_sam.variants.looksam import LookSAM
from lightning_sam.variants.msam import MSAM
from lightning_sam.variants.random_sam import RandomSAM

__all__ = ["AESAM", "ASAM", "ESAM", "LookSAM", "MSAM", "RandomSAM", "SAM", "Variant"]
