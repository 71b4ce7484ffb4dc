"""The exceptions seqattn raises.

Every error derives from :class:`SeqAttnError` and from the builtin that matches its
kind, so ``except KeyError`` and ``except SeqAttnError`` both work. A call that
raises has changed nothing: pages, reference counts and lengths are as they were.
"""

from __future__ import annotations


class SeqAttnError(Exception):
    """Base class of every error seqattn raises."""


class NoPageError(SeqAttnError, RuntimeError):
    """Not enough free pages for an allocation (nothing was allocated)."""


class UnknownSequenceError(SeqAttnError, KeyError):
    """A sequence id that the descriptor does not hold."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class SequenceExistsError(SeqAttnError, ValueError):
    """A sequence id that should be new is already live."""


class DuplicateSequenceError(SeqAttnError, ValueError):
    """The same sequence id twice in one call."""


class PageStateError(SeqAttnError, ValueError):
    """A page id out of range, a ref of a free page, or an unref below zero."""


class InvalidLengthError(SeqAttnError, ValueError):
    """A negative length, a length beyond a sequence's end, or mismatched list sizes."""


class InvalidArgumentError(SeqAttnError, ValueError):
    """A setting outside its range (e.g. a negative temperature)."""


class ArgumentTypeError(SeqAttnError, TypeError):
    """An argument of the wrong type: a bool, float or str where an integer belongs, a
    str or set where a sequence of ids belongs, a stray object where a setting belongs."""


class IndexOutOfRangeError(SeqAttnError, IndexError):
    """A layer, head or page index outside its range."""


class StaleBatchError(SeqAttnError, ValueError):
    """A packed batch whose sequences changed since it was packed, or one packed by
    another cache: its page tables no longer say where their tokens live."""


class TensorSpecError(SeqAttnError, ValueError):
    """A tensor with the wrong shape, dtype or device."""


class FlashInferUnavailableError(SeqAttnError, ImportError):
    """flashinfer is not installed, or fails to import."""


class MissingDependencyError(SeqAttnError, ImportError):
    """An optional package a call needs is not installed (the message names it)."""


class RankMismatchError(SeqAttnError, RuntimeError):
    """The ranks of one tensor-parallel group disagree: built with different settings,
    or their page tables differ at a step (they no longer run the same bookkeeping)."""
