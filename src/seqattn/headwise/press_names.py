"""Presses by name (``"streamingllm"``, ``"snapkv"``, ``"adakv"``, ``"pyramidkv"``), for
command lines and configs, each with its default settings (AdaKV scores with SnapKV).

Example:
    >>> type(make_press("SnapKV")).__name__
    'SnapKVPress'
    >>> list(PRESSES)
    ['streamingllm', 'snapkv', 'adakv', 'pyramidkv']
"""

from __future__ import annotations

from collections.abc import Callable

from .._checks import shown
from ..errors import ArgumentTypeError, InvalidArgumentError
from .press import Press, StreamingLLMPress
from .presses import AdaKVPress, PyramidKVPress, SnapKVPress

PRESSES: dict[str, Callable[[], Press]] = {
    "streamingllm": StreamingLLMPress,
    "snapkv": SnapKVPress,
    "adakv": lambda: AdaKVPress(SnapKVPress()),
    "pyramidkv": PyramidKVPress,
}


def make_press(name: object) -> Press:
    """A press of the named kind (any case) with its default settings.

    Raises:
        ArgumentTypeError: ``name`` is not a string.
        InvalidArgumentError: an unknown name.
    """
    if not isinstance(name, str):
        raise ArgumentTypeError(f"a press name must be a string, got {shown(name)}")
    make = PRESSES.get(name.lower())
    if make is None:
        raise InvalidArgumentError(f"unknown press {name!r}, choose from {', '.join(PRESSES)}")
    return make()
