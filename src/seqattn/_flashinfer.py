"""Importing flashinfer lazily: it is optional, and heavy to import."""

from __future__ import annotations

from typing import Any, Optional

from .errors import FlashInferUnavailableError

INSTALL_HINT = (
    "install flashinfer for your torch and CUDA (pip install flashinfer-python, or a wheel "
    "from https://docs.flashinfer.ai/installation.html), or use backend='torch'"
)
_MODULE: Any = None


def import_flashinfer() -> Any:
    """The flashinfer module, or a FlashInferUnavailableError saying how to install it."""
    global _MODULE
    if _MODULE is None:
        try:
            import flashinfer
        except Exception as err:  # a broken install fails in many ways, not only ImportError
            _MODULE = err
        else:
            _MODULE = flashinfer
    if isinstance(_MODULE, Exception):
        raise FlashInferUnavailableError(
            f"flashinfer could not be imported ({_MODULE}); {INSTALL_HINT}"
        ) from _MODULE
    return _MODULE


def flashinfer_or_none() -> Optional[Any]:
    """flashinfer if it imports, else None."""
    try:
        return import_flashinfer()
    except FlashInferUnavailableError:
        return None
