"""Moving a sequence's KV to another cache in one process: a copy of its pages.

:func:`export_sequence` gathers the pages of one sequence, every layer, into a
:class:`SequenceKV` (with its length, and its token ids where the prefix cache knows
them); :func:`import_sequence` starts a sequence from one in another descriptor, on pages
of its own. :mod:`seqattn.migration_p2p` does the same between two ranks of a
``torch.distributed`` group, with the checks and page writes defined here.

The source keeps its sequence: moving one is a copy followed by
``descriptor.release([seq_id])`` on the source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import attrs
import numpy as np
import torch
from attrs import field, frozen

from ._checks import exact_int, new_id, one_of, real_number, shown
from .descriptor import CacheDescriptor
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidLengthError,
    NoPageError,
    SequenceExistsError,
    TensorSpecError,
)
from .page_table import MAX_LENGTH, pages_for
from .prefix_cache import Salt, as_salt, token_array
from .storage import KV_LAYOUTS, PagedKVCacheManager

# the dtypes a cache may have, by their code on the wire
DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.float8_e4m3fn, torch.float8_e5m2,
)  # fmt: skip
# K/V are copied as the integers of their bits, whole pages at a time: exact for every
# dtype (torch's CPU index_copy_ has no float8 kernel), and wide rows copy at the
# memory's speed where a gather along the page dimension of each layer does not
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------ the exported data
def _length(value: object) -> int:
    return exact_int(value, "length", low=0, high=MAX_LENGTH, error=InvalidLengthError)


def _page_size(value: object) -> int:
    return exact_int(value, "page_size", low=1, high=2**31 - 1, error=InvalidLengthError)


def _layout(value: object) -> str:
    return one_of(value, "kv_layout", KV_LAYOUTS)


def _tokens(value: object) -> Optional[np.ndarray]:
    if value is None:
        return None
    tokens = token_array(value).copy()
    tokens.flags.writeable = False  # the object is immutable; so is what it holds
    return tokens


def _scale(value: object) -> float:
    return real_number(value, "scale", low=0.0, low_open=True)


@frozen(eq=False)
class SequenceKV:
    """One sequence's KV in every layer, and what rebuilding it takes (immutable).

    Attributes:
        length: tokens the sequence holds.
        page_size: tokens per page.
        kv_layout: ``"NHD"`` or ``"HND"``, the layout of ``pages``.
        pages: the sequence's ``ceil(length / page_size)`` pages in token order, every
            layer, as the cache stores them: ``shape: [num_layers, num_pages, 2,
            page_size, num_heads, head_dim]`` (NHD) or ``[num_layers, num_pages, 2,
            num_heads, page_size, head_dim]`` (HND), the cache's dtype, on its device.
            Index 0 of dim 2 is K, 1 is V; slots past ``length`` in the last page are
            not part of the sequence.
        token_ids: ``shape: [length], dtype: int64`` (read-only), or None when the
            source kept no token ids (no prefix caching, or tokens allocated without them).
        salt: the prefix-cache namespace the sequence was started with (str, bytes or None).
        k_scale, v_scale: the source cache's scales (stored values are ``k / k_scale``).

    Raises:
        ArgumentTypeError, InvalidLengthError, TensorSpecError: fields that do not fit
        together (``pages`` of the wrong rank, page count or page size, ``token_ids`` not
        ``length`` long).
    """

    length: int = field(converter=_length)
    page_size: int = field(converter=_page_size)
    kv_layout: str = field(converter=_layout)
    pages: torch.Tensor
    token_ids: Optional[np.ndarray] = field(default=None, converter=_tokens)
    salt: Salt = None
    k_scale: float = field(default=1.0, converter=_scale)
    v_scale: float = field(default=1.0, converter=_scale)
    _spec: Optional[PageSpec] = field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        as_salt(self.salt)  # a str, bytes or None
        spec = _checked_pages(self.pages, self.length, self.page_size, self.kv_layout)
        if self.token_ids is not None and self.token_ids.size != self.length:
            raise InvalidLengthError(
                f"token_ids must hold one id per token ({self.length}), got {self.token_ids.size}"
            )
        scaled = attrs.evolve(spec, k_scale=self.k_scale, v_scale=self.v_scale)
        object.__setattr__(self, "_spec", scaled)

    @property
    def spec(self) -> PageSpec:
        """Sizes, dtype and scales: what a destination cache must match."""
        assert self._spec is not None  # set when it is made
        return self._spec

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def num_pages(self) -> int:
        return self.spec.num_pages

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.pages.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of ``pages``."""
        return self.pages.numel() * self.pages.element_size()


@frozen
class PageSpec:
    """What a sequence's pages are: sizes, dtype, layout and scales (the wire header's
    body, and what an importing cache checks)."""

    length: int
    page_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    kv_layout: str
    k_scale: float
    v_scale: float

    @property
    def num_pages(self) -> int:
        return pages_for(self.length, self.page_size)

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page of one layer: ``[2, page_size, heads, head_dim]`` (NHD) or
        ``[2, heads, page_size, head_dim]`` (HND)."""
        ps, heads = self.page_size, self.num_heads
        inner = (ps, heads) if self.kv_layout == "NHD" else (heads, ps)
        return (2, *inner, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer."""
        return math.prod(self.page_shape) * self.dtype.itemsize

    @classmethod
    def of_cache(cls, cache: PagedKVCacheManager, length: int) -> PageSpec:
        return cls(
            length, cache.page_size, cache.num_layers, cache.num_heads, cache.head_dim,
            cache.dtype, cache.kv_layout, cache.k_scale, cache.v_scale,
        )  # fmt: skip


def _checked_pages(pages: object, length: int, page_size: int, layout: str) -> PageSpec:
    """The spec of ``pages`` for a sequence of ``length`` tokens, or raise."""
    if not isinstance(pages, torch.Tensor):
        raise ArgumentTypeError(f"pages must be a torch.Tensor, got {shown(pages)}")
    if pages.dtype not in DTYPES:
        raise TensorSpecError(f"pages must have a cache dtype {DTYPES}, got {pages.dtype}")
    shape = list(pages.shape)
    token_dim = 3 if layout == "NHD" else 4
    if pages.dim() != 6 or shape[2] != 2 or shape[token_dim] != page_size:
        where = "[layers, pages, 2, page_size, heads, head_dim]"
        if layout == "HND":
            where = "[layers, pages, 2, heads, page_size, head_dim]"
        raise TensorSpecError(
            f"pages must have shape {where} ({layout}, page_size {page_size}), got {shape}"
        )
    if shape[1] != pages_for(length, page_size):
        raise TensorSpecError(
            f"a sequence of {length} tokens holds {pages_for(length, page_size)} pages of "
            f"{page_size}, got {shape[1]} pages"
        )
    heads = shape[4] if layout == "NHD" else shape[3]
    return PageSpec(length, page_size, shape[0], heads, shape[5], pages.dtype, layout, 1.0, 1.0)


# ------------------------------------------------------------------ in one process
def export_sequence(descriptor: CacheDescriptor, seq_id: int) -> SequenceKV:
    """A copy of sequence ``seq_id``'s KV, every layer, and what rebuilding it takes.

    The pages are gathered on the cache's device in one ``index_select`` (no host copy
    of the KV); the descriptor and the cache do not change.

    Args:
        descriptor: holds the sequence.
        seq_id: a live sequence.

    Returns:
        A :class:`SequenceKV`: ``pages`` of ``shape: [num_layers, ceil(length /
        page_size), *get_kv_cache(layer).shape[1:]]``, the cache's dtype and device;
        ``token_ids`` (``[length]`` int64) when the descriptor's prefix cache knows them.

    Raises:
        ArgumentTypeError: not a descriptor, or an id that is not an integer.
        UnknownSequenceError: ``seq_id`` is not live.

    Example:
        >>> import torch
        >>> from seqattn import CacheDescriptor, PagedKVCacheManager
        >>> from seqattn.migration import export_sequence, import_sequence
        >>> src = CacheDescriptor(PagedKVCacheManager(8, 4, 2, 8, torch.float32, "cpu"))
        >>> dst = CacheDescriptor(PagedKVCacheManager(8, 4, 2, 8, torch.float32, "cpu"))
        >>> src.allocate([1], [6])  # (its KV would be appended here)
        >>> kv = export_sequence(src, 1)
        >>> kv.length, list(kv.pages.shape)  # 2 pages of [2, 4 tokens, 2 heads, 8]
        (6, [1, 2, 2, 4, 2, 8])
        >>> import_sequence(dst, 7, kv)  # on pages of dst's own
        >>> dst.seq_len(7), torch.equal(export_sequence(dst, 7).pages, kv.pages)
        (6, True)
    """
    check_descriptor(descriptor)
    length = descriptor.seq_len(seq_id)
    cache = descriptor.cache_manager
    index = page_index(descriptor.page_indices(seq_id), cache.device)
    recorded = descriptor.recorded_tokens(seq_id)
    tokens, salt = (None, None) if recorded is None else recorded
    pages = torch.empty((cache.num_layers, index.numel(), *cache.kv_data.shape[2:]),
                        dtype=cache.dtype, device=cache.device)  # fmt: skip
    gather_pages(cache.kv_data, index, pages)
    return SequenceKV(
        length, cache.page_size, cache.kv_layout, pages,
        tokens, salt, cache.k_scale, cache.v_scale,
    )  # fmt: skip


def import_sequence(descriptor: CacheDescriptor, seq_id: int, kv: SequenceKV) -> None:
    """Start sequence ``seq_id`` in ``descriptor`` holding the KV of ``kv``, on its own pages.

    With prefix caching on and ``kv.token_ids`` known, the sequence starts from the
    cached pages of its longest cached prefix (their KV is identical, and they are not
    written), gets its other pages allocated and written, and its full pages are then
    committed, so later requests can share them. Otherwise it gets ``ceil(length /
    page_size)`` fresh pages. Everything is checked first; the call is all or nothing.

    Args:
        descriptor: the destination; its cache must match ``kv`` in page size, layers,
            KV heads, head_dim, dtype and scales (the layout may differ: pages are
            converted).
        seq_id: a new sequence id (an int64 that is not live).
        kv: from :func:`export_sequence` (or built by hand), on any device.

    Raises:
        ArgumentTypeError: not a descriptor or :class:`SequenceKV`, an id that is no
            integer.
        SequenceExistsError: ``seq_id`` is live already.
        TensorSpecError: sizes or dtype that differ from the cache's.
        InvalidArgumentError: other scales, an id beyond int64.
        NoPageError: fewer available pages than the sequence needs (counting the pages
            the prefix cache would give). In every case nothing has changed.

    Example:
        >>> import torch
        >>> from seqattn import CacheDescriptor, PagedKVCacheManager
        >>> from seqattn.migration import export_sequence, import_sequence
        >>> src = CacheDescriptor(PagedKVCacheManager(8, 4, 1, 8, torch.float32, "cpu"))
        >>> dst = CacheDescriptor(PagedKVCacheManager(2, 4, 1, 8, torch.float32, "cpu"))
        >>> src.allocate([1], [9])
        >>> import_sequence(dst, 1, export_sequence(src, 1))
        Traceback (most recent call last):
        seqattn.errors.NoPageError: importing sequence 1 needs 3 free pages, the pool has 2
    """
    check_descriptor(descriptor)
    if not isinstance(kv, SequenceKV):
        raise ArgumentTypeError(f"kv must be a SequenceKV (export_sequence), got {shown(kv)}")
    spec = kv.spec
    check_import(descriptor, seq_id, spec, kv.token_ids, kv.salt)
    shared = start_import(descriptor, seq_id, spec, kv.token_ids, kv.salt)
    cache = descriptor.cache_manager

    def write(index: torch.Tensor) -> None:
        write_sequence_pages(cache, 0, index, kv.pages[:, shared:], kv.kv_layout)

    finish_import(descriptor, seq_id, shared, write)


def check_descriptor(descriptor: object) -> None:
    if not isinstance(descriptor, CacheDescriptor):
        raise ArgumentTypeError(f"descriptor must be a CacheDescriptor, got {shown(descriptor)}")


def check_import(
    descriptor: CacheDescriptor,
    seq_id: object,
    spec: PageSpec,
    tokens: Optional[np.ndarray],
    salt: Salt,
) -> None:
    """Raise unless ``descriptor`` can start ``seq_id`` holding a sequence of ``spec``."""
    new_id(seq_id)
    if seq_id in descriptor:
        raise SequenceExistsError(f"cannot import sequence {seq_id}: it is live already")
    cache = descriptor.cache_manager
    ours = PageSpec.of_cache(cache, spec.length)
    for name in ("page_size", "num_layers", "num_heads", "head_dim", "dtype"):
        expected, got = getattr(ours, name), getattr(spec, name)
        if expected != got:
            raise TensorSpecError(
                f"cannot import sequence {seq_id}: this cache has {name} {expected}, "
                f"the sequence's KV has {got}"
            )
    if (ours.k_scale, ours.v_scale) != (spec.k_scale, spec.v_scale):
        raise InvalidArgumentError(
            f"cannot import sequence {seq_id}: this cache stores K/V with scales "
            f"{(ours.k_scale, ours.v_scale)}, the sequence's KV has {(spec.k_scale, spec.v_scale)}"
        )
    need = spec.num_pages
    if tokens is not None and descriptor.prefix_cache is not None:
        need = descriptor.pages_to_start(tokens, salt=salt)  # less its prefix-cache hits
    available = cache.available_pages_count
    if need > available:
        raise NoPageError(
            f"importing sequence {seq_id} needs {need} free pages, the pool has {available}"
        )


def start_import(
    descriptor: CacheDescriptor,
    seq_id: int,
    spec: PageSpec,
    tokens: Optional[np.ndarray],
    salt: Salt,
) -> int:
    """Start ``seq_id`` holding ``spec.length`` tokens; returns how many leading pages
    came from the prefix cache (their KV is there already)."""
    if tokens is None or descriptor.prefix_cache is None:
        descriptor.allocate([seq_id], [spec.length])
        return 0
    cached = descriptor.start_sequence(seq_id, tokens, salt=salt)
    try:
        descriptor.allocate([seq_id], [spec.length - cached])
    except BaseException:
        descriptor.release([seq_id])
        raise
    return cached // spec.page_size


def finish_import(
    descriptor: CacheDescriptor,
    seq_id: int,
    shared: int,
    write: Callable[[torch.Tensor], None],
) -> None:
    """Write the KV of ``seq_id``'s own pages (past the ``shared`` cached ones), then
    publish its full pages as a prefill does; on any error the sequence is released."""
    try:
        pages = descriptor.page_indices(seq_id)[shared:]
        index = page_index(pages, descriptor.cache_manager.device)
        write(index)
        descriptor.commit([seq_id])  # a no-op without prefix caching or token ids
    except BaseException:
        descriptor.release([seq_id])
        raise


def _page_rows(pages: torch.Tensor) -> torch.Tensor:
    """Contiguous ``[layers, n, *page]`` as ``[layers * n, row]``: each page's bits as
    integers as wide as its size allows."""
    row = math.prod(pages.shape[2:])
    raw = pages.reshape(pages.shape[0] * pages.shape[1], row).view(torch.uint8)
    width = next(w for w in (8, 4, 2, 1) if raw.shape[1] % w == 0)
    return raw.view(_BITS[width])


def _rows_of(layers: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The ``[layers * n]`` rows of :func:`_page_rows` that hold pages ``index`` (``[n]``
    int64) of every layer of ``layers`` (``[layers, num_pages, *page]``)."""
    first = torch.arange(layers.shape[0], device=index.device) * layers.shape[1]
    return (first[:, None] + index[None, :]).reshape(-1)


def gather_pages(layers: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = layers[:, index]``: pages ``index`` of every layer, in one row gather
    (``layers`` and ``out`` contiguous, on one device)."""
    torch.index_select(_page_rows(layers), 0, _rows_of(layers, index), out=_page_rows(out))


def _scatter(layers: torch.Tensor, index: torch.Tensor, pages: torch.Tensor) -> None:
    """``layers[:, index] = pages`` (``layers`` contiguous; ``pages`` on its device)."""
    rows = _page_rows(pages.contiguous())
    _page_rows(layers).index_copy_(0, _rows_of(layers, index), rows)


def page_index(pages: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(pages, dtype=torch.int64).to(device)


def write_sequence_pages(
    cache: PagedKVCacheManager, first_layer: int, index: torch.Tensor, pages: torch.Tensor,
    layout: str,
) -> None:  # fmt: skip
    """Write ``pages`` (``[layers, len(index), *page]`` in ``layout``) into pages ``index``
    of layers ``first_layer ..`` of ``cache``."""
    if index.numel() == 0:
        return
    if layout != cache.kv_layout:  # NHD <-> HND: swap each page's token and head dims
        pages = pages.transpose(-3, -2)
    last = first_layer + pages.shape[0]
    _scatter(cache.kv_data[first_layer:last], index, pages.to(cache.device))
