"""Moving a sequence's KV between two ranks of a ``torch.distributed`` group.

:func:`send_sequence` on one rank and :func:`recv_sequence` on the other copy a sequence
as :func:`~seqattn.migration.export_sequence` / :func:`~seqattn.migration.import_sequence`
do in one process: a header goes first, then the pages go device to device over NCCL
(through host memory over gloo), in chunks of layers that overlap gathering, sending and
scattering. Where the sender knows the token ids, the receiver answers before the pages
travel, so that those its prefix cache holds stay home; otherwise the pages follow the
header at once and the receiver answers after them. Either way a refusal reaches both
sides and changes nothing on either. The sender keeps its sequence: a move is a send,
then ``release`` on the sender.
"""

from __future__ import annotations

import struct
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ._checks import exact_int, shown
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
from .migration import (
    DTYPES,
    PageSpec,
    check_descriptor,
    check_import,
    finish_import,
    gather_pages,
    page_index,
    start_import,
    write_sequence_pages,
)
from .prefix_cache import Salt
from .storage import KV_LAYOUTS, PagedKVCacheManager

# pages travel in chunks of whole layers of about this size, so that gathering one
# chunk overlaps sending the one before (and scattering overlaps receiving)
CHUNK_BYTES = 256 * 2**20

# The header of a transfer, int64 slots (scales as the bits of a float64)
_MAGIC = 0x5345514B56020000  # "SEQKV", protocol version 2
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
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            # from pinned memory, queued: a pageable copy would hold the host until the
            # device's queued work (the last scatter, before a status) is done
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
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
    """Tell ``peer`` the transfer is off, and why: a header (sender) or reply or status
    (receiver) carrying the error's code and message bytes, then the message."""
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


def _answer(peer: _Peer, seq_id: object) -> int:
    """The receiver's reply or status: the pages it shares; raises its refusal."""
    status, shared, size = peer.recv_ints(3)
    if status:
        _raise_refusal(peer, status, size, "the receiver", seq_id)
    return shared


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
    2. ``<-`` reply, only if the header has token ids: 3 int64 (status, pages its
       prefix cache holds already, message bytes), then the message: the receiver
       checks everything and allocates its pages before it replies, so a refusal (too
       few pages, a live id, another shape) leaves both sides as they were, and both
       raise the receiver's error.
    3. ``->`` the pages past those the receiver holds (without token ids: every page,
       right after the header), as raw bytes (uint8, so float8 travels where NCCL
       lacks the dtype), in chunks of whole layers: ``[layers, pages, *page]`` in this
       cache's layout, gathered on the device in a ring of two buffers, so that
       gathering one chunk overlaps sending the last.
    4. ``<-`` status, only if the header has no token ids: as step 2's reply (0 pages
       shared), once the receiver has written every page. It checks and allocates
       while the first pages travel; if it refuses (as in step 2) it still takes every
       page into its ring and drops it, so that the two sides stay in step, then both
       raise its error, nothing changed. A failure writing the pages is answered too,
       once the rest have arrived, the sequence released.

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
        SeqAttnError: the receiver refused (or, without token ids, failed to write the
            pages); the error is of the receiver's kind (e.g. NoPageError) and names
            its reason.
    """
    check_descriptor(descriptor)
    cache = descriptor.cache_manager
    peer = _peer(dst, "dst", group, cache)
    try:
        head, spec, tokens, salt_data = _header(descriptor, seq_id)
    except Exception as error:
        _refusal(peer, error, header=True)  # the receiver waits for a header: end that
        raise
    index = page_index(descriptor.page_indices(seq_id), cache.device)
    peer.send_ints(head)
    if tokens is not None and tokens.size:
        peer.send(torch.from_numpy(tokens))
    peer.send_bytes(salt_data)
    if tokens is None:  # the receiver can share no page: all of them now, then its status
        _send_pages(cache, index, spec, peer)
        _answer(peer, seq_id)
    else:
        _send_pages(cache, index[_answer(peer, seq_id) :], spec, peer)


def _header(
    descriptor: CacheDescriptor, seq_id: object
) -> tuple[list[int], PageSpec, Optional[np.ndarray], bytes]:
    """The header of sequence ``seq_id``, its spec, token ids and salt bytes."""
    length = descriptor.seq_len(seq_id)  # type: ignore[arg-type]
    cache = descriptor.cache_manager
    if cache.dtype not in DTYPES:
        raise TensorSpecError(f"a cache of {cache.dtype} cannot move: its dtype has no code")
    recorded = descriptor.recorded_tokens(seq_id)  # type: ignore[arg-type]
    tokens, salt = (None, None) if recorded is None else recorded
    spec = PageSpec.of_cache(cache, length)
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
    :func:`import_sequence` would: checked before any page is written, on pages of this
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
        error): nothing has changed on either side. An error writing the pages too
        (the sequence released), told to the sender if the header has no token ids.
        SeqAttnError: the sender could not send (of the sender's kind, e.g.
            UnknownSequenceError).
    """
    check_descriptor(descriptor)
    cache = descriptor.cache_manager
    peer = _peer(src, "src", group, cache)
    head, tokens, salt = _recv_header(peer, seq_id)
    inbox = None
    if tokens is None:  # every page follows the header unasked (then our status): the
        # first receives go up now, so that pages travel while this rank checks and
        # allocates (a header of unknown page size raises here, unanswered: its pages
        # cannot be taken)
        sent = _spec_of(head)
        inbox = _Inbox(sent, sent.num_pages, peer)
    try:
        spec = _spec_of(head)
        check_import(descriptor, seq_id, spec, tokens, salt)
        shared = start_import(descriptor, seq_id, spec, tokens, salt)
    except Exception as error:
        if inbox is not None:
            inbox.take(cache, None)  # dropped: the two sides stay in step
        _refusal(peer, error, header=False)
        raise
    if inbox is None:
        peer.send_ints([0, shared, 0])
    _import_pages(descriptor, seq_id, shared, spec, peer, inbox)


def _import_pages(
    descriptor: CacheDescriptor, seq_id: int, shared: int, spec: PageSpec, peer: _Peer,
    inbox: Optional[_Inbox],
) -> None:  # fmt: skip
    """Write the pages ``peer`` sends into ``seq_id``'s own (:func:`finish_import`);
    with an ``inbox`` (the pages sent unasked) send the sender its status after. A
    failure is answered only once every page has arrived (until then the sender sends,
    it reads nothing), and not at all if receiving them failed."""
    cache, taking, arrived = descriptor.cache_manager, False, False

    def write(index: torch.Tensor) -> None:
        nonlocal taking, arrived
        taking = True
        pages = inbox if inbox is not None else _Inbox(spec, index.numel(), peer)
        failed = pages.take(cache, index)
        arrived = True
        if failed is not None:
            raise failed

    try:
        finish_import(descriptor, seq_id, shared, write)
    except Exception as error:
        if inbox is not None and not taking:  # failed before the pages: take them first
            inbox.take(cache, None)
        if inbox is not None and (arrived or not taking):
            _refusal(peer, error, header=False)
        raise
    if inbox is not None:
        peer.send_ints([0, 0, 0])


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


def _spec_of(head: list[int]) -> PageSpec:
    """The spec a header describes."""
    length, ps, layers, heads, head_dim, dtype, layout, k_bits, v_bits = head[3:12]
    if not (0 <= dtype < len(DTYPES) and 0 <= layout < len(KV_LAYOUTS)):
        raise TensorSpecError(f"the sender's dtype code {dtype} or layout code {layout} is unknown")
    return PageSpec(
        length, ps, layers, heads, head_dim, DTYPES[dtype], KV_LAYOUTS[layout],
        _bits_float(k_bits), _bits_float(v_bits),
    )  # fmt: skip


def _chunks(spec: PageSpec, num_pages: int) -> list[tuple[int, int]]:
    """Layer ranges ``(first, end)`` the pages travel in (both sides compute the same):
    about ``CHUNK_BYTES`` each, but when there are several, the first and the last are
    one layer, because nothing overlaps the sender's first gather and the receiver's
    last scatter."""
    layers = spec.num_layers
    step = max(1, CHUNK_BYTES // max(num_pages * spec.page_bytes, 1))
    if step >= layers:  # one chunk: nothing to overlap
        return [(0, layers)]
    inner = [(i, min(i + step, layers - 1)) for i in range(1, layers - 1, step)]
    return [(0, 1), *inner, (layers - 1, layers)]


def _chunk_view(buffer: torch.Tensor, spec: PageSpec, layers: int, num_pages: int) -> torch.Tensor:
    """``[layers, num_pages, *page]`` of ``spec.dtype`` at the start of a uint8 buffer."""
    size = layers * num_pages * spec.page_bytes
    return buffer[:size].view(spec.dtype).view(layers, num_pages, *spec.page_shape)


def _ring(
    spec: PageSpec, num_pages: int, device: torch.device
) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """The chunks ``num_pages`` pages of every layer travel in, and the (at most two)
    uint8 buffers a side cycles them through."""
    chunks = _chunks(spec, num_pages)
    size = max(end - first for first, end in chunks) * num_pages * spec.page_bytes
    return chunks, [torch.empty(size, dtype=torch.uint8, device=device) for _ in chunks[:2]]


def _send_pages(
    cache: PagedKVCacheManager, index: torch.Tensor, spec: PageSpec, peer: _Peer
) -> None:
    """Send pages ``index`` of every layer, chunk by chunk through two buffers."""
    n = index.numel()
    if n == 0:
        return
    chunks, buffers = _ring(spec, n, peer.device)
    works = []
    for i, (first, end) in enumerate(chunks):
        if i >= 2:
            works[i - 2].wait()  # its buffer is free again (on NCCL: for the stream)
        out = _chunk_view(buffers[i % 2], spec, end - first, n)
        layers = cache.kv_data[first:end]
        if out.device == cache.device:
            gather_pages(layers, index, out)
        else:  # gloo with a CUDA cache: through the host
            gathered = torch.empty_like(out, device=cache.device)
            gather_pages(layers, index, gathered)
            out.copy_(gathered)
        sent = buffers[i % 2][: out.numel() * out.element_size()]
        works.append(dist.isend(sent, peer.rank, group=peer.group))
    for work in works[-2:]:
        work.wait()


class _Inbox:
    """Pages of every layer arriving from ``peer``, ``num_pages`` of them, chunk by
    chunk through a ring of two buffers; the first two receives are posted at once, so
    that the pages travel while this rank does other work (checks, allocation)."""

    def __init__(self, spec: PageSpec, num_pages: int, peer: _Peer) -> None:
        self.spec, self.num_pages, self.peer = spec, num_pages, peer
        self.chunks, self.buffers = _ring(spec, num_pages, peer.device) if num_pages else ([], [])
        self.works = [self._post(i) for i in range(len(self.buffers))]

    def _post(self, i: int) -> dist.Work:
        first, end = self.chunks[i]
        part = self.buffers[i % 2][: (end - first) * self.num_pages * self.spec.page_bytes]
        return dist.irecv(part, self.peer.rank, group=self.peer.group)

    def take(
        self, cache: PagedKVCacheManager, index: Optional[torch.Tensor]
    ) -> Optional[Exception]:
        """Receive every chunk, scattering each into pages ``index`` (``[num_pages]``
        int64 on the cache's device; None: drop them) while the next one arrives.
        Returns the error a scatter raised: it ends the scattering, not the receiving,
        as the sender sends every chunk regardless."""
        spec, n, failed = self.spec, self.num_pages, None
        for i, (first, end) in enumerate(self.chunks):
            self.works[i].wait()
            chunk = _chunk_view(self.buffers[i % 2], spec, end - first, n)
            try:
                if index is not None and failed is None:
                    write_sequence_pages(cache, first, index, chunk, spec.kv_layout)
            except Exception as error:
                failed = error
            if i + 2 < len(self.chunks):  # on NCCL it waits, on its stream, for the write
                self.works.append(self._post(i + 2))
        return failed
