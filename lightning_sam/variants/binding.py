"""Checks that tie a variant to the run's settings, optimizer and strategy, shared by every face."""

from __future__ import annotations

from typing import Any, Optional

from lightning_sam.config import SAMConfig
from lightning_sam.variants.base import SAM, Variant


def check_variant(variant: Optional[Variant], config: SAMConfig) -> Variant:
    """The variant to run (plain SAM for ``None``); refuse one that is not a variant or cannot take the settings."""
    if variant is None:
        return SAM()
    if not isinstance(variant, Variant):
        raise TypeError(
            f"`variant` must be an instance of a class in `lightning_sam.variants` (e.g. `LookSAM(k=5)`), got"
            f" {variant!r}."
        )
    if config.m is not None and not variant.supports_chunks:
        raise ValueError(f"{variant!r} does not take `m`: it makes no ε per group of examples. Leave `m=None`.")
    if config.same_randomness and variant.needs_example_losses:
        raise ValueError(
            f"`same_randomness=True` cannot hold with {variant!r}: its second pass runs on a subset of the examples,"
            " whose random draws cannot be those of the first pass. Use gamma=1, or same_randomness=False."
        )
    return variant


def bind_variant(variant: Variant, optimizer: Any, config: SAMConfig, world_size: int) -> None:
    """At fit start (Lightning) or construction (SAMOptimizer): the optimizer and the strategy are known."""
    if world_size > 1 and not variant.supports_distributed:
        raise ValueError(
            f"{variant!r} cannot run under distributed training: each device would decide from its own gradient,"
            " and keeping them in step needs a collective beyond DDP's one all-reduce per step. Use it on one device,"
            " or use `RandomSAM` (identical draws on every rank) or `LookSAM`."
        )
    variant.bind(optimizer)


def is_default(variant: Variant) -> bool:
    return type(variant) is SAM and variant.rho_schedule is None


def load_variant_state(variant: Variant, saved: Optional[dict[str, Any]]) -> None:
    if not saved:
        return
    name = saved.get("name")
    if name is not None and name != type(variant).__name__:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"The checkpoint was written with the variant {name}; this run uses {type(variant).__name__}, which starts"
            " from a fresh state."
        )
        return
    variant.load_full_state_dict(saved.get("state", {}))


def variant_state(variant: Variant) -> dict[str, Any]:
    return {"name": type(variant).__name__, "state": variant.full_state_dict()}
