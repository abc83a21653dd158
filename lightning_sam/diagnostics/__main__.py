"""``python -m lightning_sam.diagnostics CKPT ...``: the same as ``lightning-sam-flatness``."""

from lightning_sam.diagnostics.cli import main

main()
