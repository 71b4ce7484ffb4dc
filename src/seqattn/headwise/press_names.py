"""Presses by name (``"streamingllm"``, ``"snapkv"``, ...), for command lines and configs.

The names map to class names looked up in :mod:`seqattn.headwise.press` when asked
for, so a name whose class this version lacks is refused like any unknown name.

Example:
    >>> type(make_press("streamingllm")).__name__
    'StreamingLLMPress'
    >>> "streamingllm" in available_presses()
    True
"""

from __future__ import annotations

from .._checks import shown
from ..errors import ArgumentTypeError, InvalidArgumentError
from . import press as press_module
from .press import Press

# name -> class in seqattn.headwise.press
PRESS_CLASSES = {
    "streamingllm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "adakv": "AdaKVPress",
    "pyramidkv": "PyramidKVPress",
}


def available_presses() -> list[str]:
    """The names whose press class this version of seqattn has, in registry order."""
    return [name for name, cls in PRESS_CLASSES.items() if _press_class(cls) is not None]


def make_press(name: object) -> Press:
    """A press of the named kind with its default settings.

    Raises:
        ArgumentTypeError: ``name`` is not a string.
        InvalidArgumentError: an unknown name, one whose class is not here (yet), or
            a class that cannot be made without arguments.
    """
    if not isinstance(name, str):
        raise ArgumentTypeError(f"a press name must be a string, got {shown(name)}")
    cls = _press_class(PRESS_CLASSES.get(name.lower(), ""))
    if cls is None:
        raise InvalidArgumentError(
            f"unknown press {name!r}, choose from {', '.join(available_presses())}"
        )
    try:
        return cls()
    except TypeError as error:  # a press whose settings have no defaults
        raise InvalidArgumentError(
            f"press {name!r} ({cls.__name__}) needs settings to be made: {error}"
        ) from None


def _press_class(name: str) -> type[Press] | None:
    cls = getattr(press_module, name, None) if name else None
    return cls if isinstance(cls, type) and issubclass(cls, Press) else None
