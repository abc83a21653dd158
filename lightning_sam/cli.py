"""``lightning-sam``: LightningCLI with SAM (``fit``, ``validate``, ``test``, ``predict``).

Example:

    lightning-sam fit --config examples/configs/fashion_mnist_sam.yaml
    lightning-sam fit --config examples/configs/fashion_mnist_sam.yaml --trainer.callbacks+=... --print_config
    python -m lightning_sam test --config examples/configs/fashion_mnist_sam.yaml --ckpt_path runs/.../last.ckpt

SAM is the ``lightning_sam.SAM`` callback under ``trainer.callbacks``. A config may instead declare a
``lightning_sam.SAMOptimizer`` (top-level ``optimizer:`` or the model's ``optimizer:``) with a nested base optimizer;
the CLI then adds a ``SAM`` callback so the optimizer is driven by the SAM step under every precision.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sam.callback import SAM


class SAMLightningCLI(LightningCLI):
    """LightningCLI that checks SAM settings before anything trains."""

    def before_instantiate_classes(self) -> None:
        config = self._active_config()
        trainer = config.get("trainer", {}) or {}
        callbacks = trainer.get("callbacks") or []
        has_sam = any(_class_path(cb).endswith(".SAM") for cb in callbacks) or _declares(config, ".SAMOptimizer")
        if has_sam and trainer.get("gradient_clip_val") and trainer.get("gradient_clip_algorithm") == "value":
            raise MisconfigurationException(
                'trainer.gradient_clip_algorithm: "value" is not supported with SAM: clipping each entry changes the'
                ' direction of the gradient. Use "norm" (the default).'
            )

    def before_fit(self) -> None:
        config = self._active_config()
        if _declares(config, ".SAMOptimizer") and not any(isinstance(cb, SAM) for cb in self.trainer.callbacks):
            # A SAMOptimizer needs the SAM step to be correct under fp16 and to keep BatchNorm statistics and logs.
            self.trainer.callbacks.append(SAM())

    def _active_config(self) -> Any:
        return self.config.get(self.subcommand, self.config) if self.subcommand else self.config


def _class_path(entry: Any) -> str:
    if isinstance(entry, dict) or hasattr(entry, "get"):
        return str(entry.get("class_path", "") or "")
    return type(entry).__module__ + "." + type(entry).__qualname__


def _declares(node: Any, suffix: str) -> bool:
    """True if any ``class_path`` in the (nested) config ends with ``suffix``."""
    if hasattr(node, "items"):  # a dict, or a jsonargparse Namespace (whose items() have dotted keys)
        return any(
            (key.rsplit(".", 1)[-1] == "class_path" and isinstance(value, str) and value.endswith(suffix))
            or _declares(value, suffix)
            for key, value in node.items()
        )
    if isinstance(node, (list, tuple)):
        return any(_declares(item, suffix) for item in node)
    return False


def main(args: Optional[list[str]] = None) -> None:
    SAMLightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=True,
    )


if __name__ == "__main__":
    main()
