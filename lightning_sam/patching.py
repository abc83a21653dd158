"""One tool for every attribute lightning_sam sets on objects it does not own, and puts back exactly.

Modelled on Lightning's ``_ForwardRedirection``: patch, run, restore, and leave nothing behind. A patch remembers
whether the name was in the object's own ``__dict__`` (an instance attribute, such as the compiled ``training_step``
that ``torch.compile`` makes Lightning install) or came from its class, and restores exactly that state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ABSENT = object()


class Patcher:
    """Sets attributes on objects and restores them, last in first out.

    Example:

        patcher = Patcher()
        patcher.set(trainer.strategy, "training_step", sam_training_step)
        ...
        patcher.restore()  # the strategy is as it was, instance attributes included
    """

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``obj.name = value`` until ``restore``. Properties with a setter are set and later reset through it."""
        if _is_data_descriptor(type(obj), name):
            previous = getattr(obj, name)
        else:
            previous = vars(obj).get(name, _ABSENT) if hasattr(obj, "__dict__") else getattr(obj, name)
        self._saved.append((obj, name, previous))
        setattr(obj, name, value)

    def restore(self) -> None:
        """Undo every ``set`` in reverse order; safe to call twice."""
        while self._saved:
            obj, name, previous = self._saved.pop()
            if previous is _ABSENT:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, previous)

    @contextmanager
    def scoped(self) -> Iterator[Patcher]:
        """A nested patcher whose patches are undone when the block exits, also on an exception."""
        inner = Patcher()
        try:
            yield inner
        finally:
            inner.restore()

    def __bool__(self) -> bool:
        return bool(self._saved)


def _is_data_descriptor(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            return hasattr(attr, "__set__")
    return False
