"""Moving a sequence's KV to another cache: a copy in one process, send/recv between ranks.

:func:`export_sequence` gathers the pages of one sequence, every layer, into a
:class:`SequenceKV` (with its length, and its token ids where the prefix cache knows
them); :func:`import_sequence` starts a sequence from one in another descriptor, on pages
of its own. :func:`send_sequence` / :func:`recv_sequence` do the same between two ranks
of a ``torch.distributed`` group: the receiver checks that it can take the sequence
before any page travels, and the pages go device to device over NCCL (through host
memory over gloo).

The source keeps its sequence: moving one is a copy followed by
``descriptor.release([seq_id])`` on the source.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Optional

import attrs
import numpy as np
import torch
import torch.distributed as dist
from attrs import field, frozen

from ._checks import exact_int, new_id, one_of, real_number, shown
from .descriptor import CacheDescriptor
from .errors import (
    ArgumentTypeError,
    DuplicateSequenceError,
    IndexOutOfRangeError,
    InvalidArgumentError,
    InvalidLengthError,
    NoPageError,
    PageStateError,
    SeqAttnError,
    SequenceExistsError,
    StaleBatchError,
    TensorSpecError,
    UnknownSequenceError,
)
from .page_table import MAX_LENGTH, pages_for
from .prefix_cache import Salt, as_salt, token_array
from .storage import KV_LAYOUTS, PagedKVCacheManager

# the dtypes a cache may have, by their code on the wire
DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.float8_e4m3fn, torch.float8_e5m2,
)  # fmt: skip
# pages travel in chunks of whole layers of about this size, so that gathering one
# chunk overlaps sending the one before (and scattering overlaps receiving)
CHUNK_BYTES = 256 * 2**20
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
    _spec: Optional[_Spec] = field(init=False, default=None, repr=False)

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
    def spec(self) -> _Spec:
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
class _Spec:
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
        return 2 * self.page_size * self.num_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def of_cache(cls, cache: PagedKVCacheManager, length: int) -> _Spec:
        return cls(
            length, cache.page_size, cache.num_layers, cache.num_heads, cache.head_dim,
            cache.dtype, cache.kv_layout, cache.k_scale, cache.v_scale,
        )  # fmt: skip


def _checked_pages(pages: object, length: int, page_size: int, layout: str) -> _Spec:
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
    return _Spec(length, page_size, shape[0], heads, shape[5], pages.dtype, layout, 1.0, 1.0)


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
    _check_descriptor(descriptor)
    length = descriptor.seq_len(seq_id)
    cache = descriptor.cache_manager
    index = _index(descriptor.page_indices(seq_id), cache.device)
    recorded = descriptor.recorded_tokens(seq_id)
    tokens, salt = (None, None) if recorded is None else recorded
    pages = torch.empty((cache.num_layers, index.numel(), *cache.kv_data.shape[2:]),
                        dtype=cache.dtype, device=cache.device)  # fmt: skip
    _gather(cache.kv_data, index, pages)
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
    _check_descriptor(descriptor)
    if not isinstance(kv, SequenceKV):
        raise ArgumentTypeError(f"kv must be a SequenceKV (export_sequence), got {shown(kv)}")
    spec = kv.spec
    _check_import(descriptor, seq_id, spec, kv.token_ids, kv.salt)
    shared = _allocate(descriptor, seq_id, spec, kv.token_ids, kv.salt)
    cache = descriptor.cache_manager

    def write(index: torch.Tensor) -> None:
        _write(cache, 0, index, kv.pages[:, shared:], kv.kv_layout)

    _finish(descriptor, seq_id, shared, write)


def _check_descriptor(descriptor: object) -> None:
    if not isinstance(descriptor, CacheDescriptor):
        raise ArgumentTypeError(f"descriptor must be a CacheDescriptor, got {shown(descriptor)}")


def _check_import(
    descriptor: CacheDescriptor,
    seq_id: object,
    spec: _Spec,
    tokens: Optional[np.ndarray],
    salt: Salt,
) -> None:
    """Raise unless ``descriptor`` can start ``seq_id`` holding a sequence of ``spec``."""
    new_id(seq_id)
    if seq_id in descriptor:
        raise SequenceExistsError(f"cannot import sequence {seq_id}: it is live already")
    cache = descriptor.cache_manager
    ours = _Spec.of_cache(cache, spec.length)
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


def _allocate(
    descriptor: CacheDescriptor,
    seq_id: int,
    spec: _Spec,
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


def _finish(
    descriptor: CacheDescriptor,
    seq_id: int,
    shared: int,
    write: Callable[[torch.Tensor], None],
) -> None:
    """Write the KV of ``seq_id``'s own pages (past the ``shared`` cached ones), then
    publish its full pages as a prefill does; on any error the sequence is released."""
    try:
        index = _index(descriptor.page_indices(seq_id)[shared:], descriptor.cache_manager.device)
        write(index)
        descriptor.commit([seq_id])  # a no-op without prefix caching or token ids
    except BaseException:
        descriptor.release([seq_id])
        raise


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element size (the same bits)."""
    return t.view(_BITS[t.element_size()])


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


def _gather(layers: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = layers[:, index]``: pages ``index`` of every layer, in one row gather
    (``layers`` and ``out`` contiguous, on one device)."""
    torch.index_select(_page_rows(layers), 0, _rows_of(layers, index), out=_page_rows(out))


def _scatter(layers: torch.Tensor, index: torch.Tensor, pages: torch.Tensor) -> None:
    """``layers[:, index] = pages`` (``layers`` contiguous; ``pages`` on its device)."""
    rows = _page_rows(pages.contiguous())
    _page_rows(layers).index_copy_(0, _rows_of(layers, index), rows)


def _index(pages: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(pages, dtype=torch.int64).to(device)


def _write(
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


# ------------------------------------------------------------------ between ranks
# The header of a transfer, int64 slots (scales as the bits of a float64)
_MAGIC = 0x5345514B56010000  # "SEQKV", protocol version 1
_HEADER = 16
_ERRORS: tuple[type[SeqAttnError], ...] = (
    SeqAttnError, ArgumentTypeError, InvalidArgumentError, InvalidLengthError,
    TensorSpecError, SequenceExistsError, UnknownSequenceError, NoPageError,
    IndexOutOfRangeError, DuplicateSequenceError, PageStateError, StaleBatchError,
)  # fmt: skip


class _Peer:
    """The other rank of a transfer: blocking sends and receives of tensors on the
    device the group moves them on."""

    def __init__(self, rank: int, group: Optional[dist.ProcessGroup], device: torch.device):
        self.rank, self.group, self.device = rank, group, device

    def send(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.to(self.device), self.rank, group=self.group)

    def recv(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(numel, dtype=dtype, device=self.device)
        dist.recv(tensor, self.rank, group=self.group)
        return tensor

    def send_ints(self, values: list[int]) -> None:
        self.send(torch.tensor(values, dtype=torch.int64))

    def recv_ints(self, n: int) -> list[int]:
        return self.recv(n, torch.int64).tolist()  # type: ignore[no-any-return]

    def send_bytes(self, data: bytes) -> None:
        if data:
            self.send(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def recv_bytes(self, n: int) -> bytes:
        return bytes(self.recv(n, torch.uint8).cpu().numpy()) if n else b""


def _peer(rank: object, what: str, group: object, cache: PagedKVCacheManager) -> _Peer:
    """The peer ``rank`` of ``group``, checked (a rank of the group, not this one), and
    where tensors travel: the cache's CUDA device over NCCL, else the host."""
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            "moving a sequence between ranks needs torch.distributed initialized "
            "(dist.init_process_group); it is not"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ArgumentTypeError(f"group must be None or a ProcessGroup, got {shown(group)}")
    peer = exact_int(rank, what, low=0, high=2**31 - 1, error=IndexOutOfRangeError)
    ranks = dist.get_process_group_ranks(group) if group is not None else None
    world = dist.get_world_size()
    if (ranks is None and peer >= world) or (ranks is not None and peer not in ranks):
        shown_ranks = f"[0, {world})" if ranks is None else str(ranks[:8])
        raise IndexOutOfRangeError(f"{what} must be a rank in {shown_ranks}, got {peer}")
    if peer == dist.get_rank():
        raise InvalidArgumentError(f"{what} must be another rank than this one, got {peer}")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and cache.device.type == "cuda":
        return _Peer(peer, group, cache.device)  # NCCL: device to device, no host copy
    if backend == "nccl":
        raise InvalidArgumentError(
            f"an NCCL group moves CUDA tensors, but this cache is on {cache.device}: "
            "use a gloo group"
        )
    return _Peer(peer, group, torch.device("cpu"))


def _float_bits(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def _salt_bytes(salt: Salt) -> tuple[int, bytes]:
    if salt is None:
        return 0, b""
    return (1, salt.encode()) if isinstance(salt, str) else (2, bytes(salt))


def _refusal(peer: _Peer, error: BaseException, header: bool) -> None:
    """Tell ``peer`` the transfer is off, and why: a header (sender) or reply (receiver)
    carrying the error's code and message, then the message."""
    kind = type(error)
    code = next((i for i, cls in enumerate(_ERRORS) if kind is cls), None)
    if code is None:
        code = next((i for i, cls in enumerate(_ERRORS) if isinstance(error, cls)), 0)
    text = str(error) if isinstance(error, SeqAttnError) else f"{kind.__name__}: {error}"
    data = text.encode()[:4000]
    if header:
        peer.send_ints([_MAGIC, code + 1, len(data), *[0] * (_HEADER - 3)])
    else:
        peer.send_ints([code + 1, 0, len(data)])
    peer.send_bytes(data)


def _raise_refusal(peer: _Peer, code: int, size: int, who: str, seq_id: object) -> None:
    message = peer.recv_bytes(size).decode(errors="replace")
    cls = _ERRORS[code - 1] if 0 < code <= len(_ERRORS) else SeqAttnError
    raise cls(f"rank {peer.rank} ({who}) refused to move sequence {seq_id}: {message}")


def send_sequence(
    descriptor: CacheDescriptor,
    seq_id: int,
    dst: int,
    group: Optional[dist.ProcessGroup] = None,
) -> None:
    """Send sequence ``seq_id``'s KV and what rebuilding it takes to rank ``dst``, whose
    :func:`recv_sequence` starts it there. The sequence stays here: to move it, call
    ``descriptor.release([seq_id])`` after this returns.

    The wire protocol (every message a tensor on the cache's CUDA device over NCCL, on
    the host over gloo; ``->`` is this rank to ``dst``):

    1. ``->`` header: 16 int64 (magic and version, status, message bytes, length,
       page_size, layers, KV heads, head_dim, dtype code, layout code, k_scale and
       v_scale as float64 bits, has token ids, salt kind, salt bytes, 0); then the
       token ids (``[length]`` int64) if any and the salt (uint8) if any. A sender
       that cannot send (an unknown ``seq_id``) says so here (status = its error's
       code, then the message as uint8) and both sides raise.
    2. ``<-`` reply: 3 int64 (status, pages its prefix cache holds already, message
       bytes), then the message: the receiver checks everything and allocates its pages
       before it replies, so a refusal (too few pages, a live id, another shape) leaves
       both sides as they were, and both raise the receiver's error.
    3. ``->`` the pages past those the receiver holds, as raw bytes (uint8, so float8
       travels where NCCL lacks the dtype), in chunks of whole layers: ``[layers,
       pages, *page]`` in this cache's layout, gathered on the device in a ring of two
       buffers, so that gathering one chunk overlaps sending the last.

    Args:
        descriptor: holds the sequence.
        seq_id: a live sequence.
        dst: the receiving rank (a global rank, as ``dist.send`` takes).
        group: the process group (None: the default group).

    Raises:
        ArgumentTypeError, IndexOutOfRangeError, InvalidArgumentError: a bad descriptor,
            ``dst`` or ``group``, or torch.distributed not initialized (raised here
            only: the receiver is not told).
        UnknownSequenceError: ``seq_id`` is not live (the receiver raises it too).
        SeqAttnError: the receiver refused; the error is of the receiver's kind
            (e.g. NoPageError) and names its reason.
    """
    _check_descriptor(descriptor)
    cache = descriptor.cache_manager
    peer = _peer(dst, "dst", group, cache)
    try:
        head, spec, tokens, salt_data = _header(descriptor, seq_id)
    except Exception as error:
        _refusal(peer, error, header=True)  # the receiver waits for a header: end that
        raise
    peer.send_ints(head)
    if tokens is not None and tokens.size:
        peer.send(torch.from_numpy(tokens))
    peer.send_bytes(salt_data)
    status, shared, size = peer.recv_ints(3)
    if status:
        _raise_refusal(peer, status, size, "the receiver", seq_id)
    pages = descriptor.page_indices(seq_id)[shared:]
    _send_pages(cache, _index(pages, cache.device), spec, peer)


def _header(
    descriptor: CacheDescriptor, seq_id: object
) -> tuple[list[int], _Spec, Optional[np.ndarray], bytes]:
    """The header of sequence ``seq_id``, its spec, token ids and salt bytes."""
    length = descriptor.seq_len(seq_id)  # type: ignore[arg-type]
    cache = descriptor.cache_manager
    if cache.dtype not in DTYPES:
        raise TensorSpecError(f"a cache of {cache.dtype} cannot move: its dtype has no code")
    recorded = descriptor.recorded_tokens(seq_id)  # type: ignore[arg-type]
    tokens, salt = (None, None) if recorded is None else recorded
    spec = _Spec.of_cache(cache, length)
    kind, salt_data = _salt_bytes(salt)
    head = [
        _MAGIC, 0, 0, length, spec.page_size, spec.num_layers, spec.num_heads,
        spec.head_dim, DTYPES.index(spec.dtype), KV_LAYOUTS.index(spec.kv_layout),
        _float_bits(spec.k_scale), _float_bits(spec.v_scale), int(tokens is not None),
        kind, len(salt_data), 0,
    ]  # fmt: skip
    return head, spec, tokens, salt_data


def recv_sequence(
    descriptor: CacheDescriptor,
    seq_id: int,
    src: int,
    group: Optional[dist.ProcessGroup] = None,
) -> None:
    """Start sequence ``seq_id`` here with the KV rank ``src`` sends
    (:func:`send_sequence`, whose docstring gives the protocol), as
    :func:`import_sequence` would: checked before any page travels, on pages of this
    descriptor's own, sharing its prefix cache's pages where the sender knows the
    sequence's token ids.

    Args:
        descriptor: the destination.
        seq_id: a new sequence id here (it may differ from the sender's).
        src: the sending rank (a global rank).
        group: the process group (None: the default group).

    Raises:
        ArgumentTypeError, IndexOutOfRangeError, InvalidArgumentError: a bad descriptor,
            ``src`` or ``group``, or torch.distributed not initialized (raised here
            only: the sender is not told).
        As :func:`import_sequence`, after refusing the sender (which raises the same
        error): nothing has changed on either side.
        SeqAttnError: the sender could not send (of the sender's kind, e.g.
            UnknownSequenceError).
    """
    _check_descriptor(descriptor)
    cache = descriptor.cache_manager
    peer = _peer(src, "src", group, cache)
    head, tokens, salt = _recv_header(peer, seq_id)
    try:
        spec = _spec_of(head)
        _check_import(descriptor, seq_id, spec, tokens, salt)
        shared = _allocate(descriptor, seq_id, spec, tokens, salt)
    except Exception as error:
        _refusal(peer, error, header=False)
        raise
    peer.send_ints([0, shared, 0])

    def write(index: torch.Tensor) -> None:
        _recv_pages(cache, index, spec, peer)

    _finish(descriptor, seq_id, shared, write)


def _recv_header(peer: _Peer, seq_id: object) -> tuple[list[int], Optional[np.ndarray], Salt]:
    """The sender's header, token ids and salt; raises the sender's refusal."""
    head = peer.recv_ints(_HEADER)
    if head[0] != _MAGIC:
        raise InvalidArgumentError(
            f"rank {peer.rank} sent no sequence header (magic {head[0]:#x}, expected "
            f"{_MAGIC:#x}): are both sides seqattn send_sequence/recv_sequence?"
        )
    if head[1]:
        _raise_refusal(peer, head[1], head[2], "the sender", seq_id)
    length, (has_tokens, salt_kind, salt_size) = head[3], head[12:15]
    tokens = None
    if has_tokens:
        tokens = peer.recv(length, torch.int64).cpu().numpy() if length else np.zeros(0, np.int64)
    salt_data = peer.recv_bytes(salt_size)
    salt: Salt = None if salt_kind == 0 else salt_data.decode() if salt_kind == 1 else salt_data
    return head, tokens, salt


def _spec_of(head: list[int]) -> _Spec:
    """The spec a header describes."""
    length, ps, layers, heads, head_dim, dtype, layout, k_bits, v_bits = head[3:12]
    if not (0 <= dtype < len(DTYPES) and 0 <= layout < len(KV_LAYOUTS)):
        raise TensorSpecError(f"the sender's dtype code {dtype} or layout code {layout} is unknown")
    return _Spec(
        length, ps, layers, heads, head_dim, DTYPES[dtype], KV_LAYOUTS[layout],
        _bits_float(k_bits), _bits_float(v_bits),
    )  # fmt: skip


def _chunks(spec: _Spec, num_pages: int) -> list[tuple[int, int]]:
    """Layer ranges ``(first, end)`` the pages travel in (both sides compute the same)."""
    per_layer = max(num_pages * spec.page_bytes, 1)
    step = max(1, CHUNK_BYTES // per_layer)
    return [(i, min(i + step, spec.num_layers)) for i in range(0, spec.num_layers, step)]


def _chunk_view(buffer: torch.Tensor, spec: _Spec, layers: int, num_pages: int) -> torch.Tensor:
    """``[layers, num_pages, *page]`` of ``spec.dtype`` at the start of a uint8 buffer."""
    size = layers * num_pages * spec.page_bytes
    return buffer[:size].view(spec.dtype).view(layers, num_pages, *spec.page_shape)


def _send_pages(cache: PagedKVCacheManager, index: torch.Tensor, spec: _Spec, peer: _Peer) -> None:
    """Send pages ``index`` of every layer, chunk by chunk through two buffers."""
    n = index.numel()
    if n == 0:
        return
    chunks = _chunks(spec, n)
    size = (chunks[0][1] - chunks[0][0]) * n * spec.page_bytes
    buffers = [torch.empty(size, dtype=torch.uint8, device=peer.device) for _ in chunks[:2]]
    works = []
    for i, (first, end) in enumerate(chunks):
        if i >= 2:
            works[i - 2].wait()  # its buffer is free again (on NCCL: for the stream)
        out = _chunk_view(buffers[i % 2], spec, end - first, n)
        layers = cache.kv_data[first:end]
        if out.device == cache.device:
            _gather(layers, index, out)
        else:  # gloo with a CUDA cache: through the host
            gathered = torch.empty_like(out, device=cache.device)
            _gather(layers, index, gathered)
            out.copy_(gathered)
        sent = buffers[i % 2][: out.numel() * out.element_size()]
        works.append(dist.isend(sent, peer.rank, group=peer.group))
    for work in works[-2:]:
        work.wait()


def _recv_pages(cache: PagedKVCacheManager, index: torch.Tensor, spec: _Spec, peer: _Peer) -> None:
    """Receive pages into ``index`` of every layer, chunk by chunk through two buffers:
    each chunk is scattered while the next one arrives."""
    n = index.numel()
    if n == 0:
        return
    chunks = _chunks(spec, n)
    size = (chunks[0][1] - chunks[0][0]) * n * spec.page_bytes
    buffers = [torch.empty(size, dtype=torch.uint8, device=peer.device) for _ in chunks[:2]]

    def post(i: int) -> dist.Work:
        first, end = chunks[i]
        part = buffers[i % 2][: (end - first) * n * spec.page_bytes]
        return dist.irecv(part, peer.rank, group=peer.group)

    works = [post(i) for i in range(len(buffers))]
    for i, (first, end) in enumerate(chunks):
        works[i].wait()
        _write(cache, first, index, _chunk_view(buffers[i % 2], spec, end - first, n),
               spec.kv_layout)  # fmt: skip
        if i + 2 < len(chunks):  # on NCCL it waits, on its stream, for the write above
            works.append(post(i + 2))
