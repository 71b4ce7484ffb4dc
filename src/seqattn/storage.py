"""KV storage for every layer of a model, and appending K/V into its pages."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ._checks import checked_index, exact_int, real_number, shown
from ._flashinfer import flashinfer_or_none
from ._transfer import upload
from .allocator import PageAllocator, PageIds, checked_page_ids
from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidLengthError,
    TensorSpecError,
)
from .packed_data import Device, FlashInferPackedData, as_device, derived_append

KV_LAYOUTS = ("NHD", "HND")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
QUANTIZABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLASHINFER_APPEND_HEAD_DIMS = (64, 128, 256, 512)
FLASHINFER_APPEND_DTYPES = (torch.float16, torch.bfloat16, *FP8_DTYPES)


class PagedKVCacheManager:
    """Pages of K/V for ``num_layers`` layers, with the pool that hands them out.

    Storage per layer is one tensor flashinfer takes as ``paged_kv_cache`` directly:
    ``[num_pages, 2, page_size, num_heads, head_dim]`` for ``kv_layout="NHD"``, or
    ``[num_pages, 2, num_heads, page_size, head_dim]`` for ``"HND"`` (index 0 of dim 1
    is K, 1 is V). A page id names the same page in every layer.

    Args:
        num_pages: pages in the pool.
        page_size: tokens per page.
        num_heads: KV heads.
        head_dim: size of each head.
        dtype: storage dtype.
        device: a ``torch.device``, a string, or a CUDA ordinal.
        kv_layout: ``"NHD"`` or ``"HND"``.
        num_layers: layers of the model that share the page table.
        k_scale, v_scale: for a float8 cache, the stored values are ``k / k_scale`` and
            ``v / v_scale`` (quantized on append; attention multiplies them back).

    Example:
        >>> import torch
        >>> from seqattn import CacheDescriptor, PagedKVCacheManager
        >>> cache = PagedKVCacheManager(64, 16, num_heads=2, head_dim=8,
        ...                             dtype=torch.float32, device="cpu", num_layers=2)
        >>> desc = CacheDescriptor(cache)
        >>> desc.allocate([7], [20])
        >>> packed = desc.pack_for_flashinfer([7], append_lens=[20])
        >>> k = torch.randn(20, 2, 8); v = torch.randn(20, 2, 8)
        >>> cache.append_kv(k, v, packed, layer=1)
        >>> key_cache, value_cache = cache.get_memory_tensors(layer=1)
        >>> page, slot = packed.kv_page_indices[1].item(), 3  # token 16 + 3 = 19
        >>> torch.equal(key_cache[page, slot], k[19])
        True
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Device,
        kv_layout: str = "NHD",
        *,
        num_layers: int = 1,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        sizes = [
            exact_int(value, name, low=1, high=2**31 - 1, error=InvalidLengthError)
            for name, value in (
                ("num_pages", num_pages),
                ("page_size", page_size),
                ("num_heads", num_heads),
                ("head_dim", head_dim),
                ("num_layers", num_layers),
            )
        ]
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ArgumentTypeError(f"dtype must be a floating torch.dtype, got {shown(dtype)}")
        if kv_layout not in KV_LAYOUTS:
            raise InvalidArgumentError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
        self.k_scale = real_number(k_scale, "k_scale", low=0.0, low_open=True)
        self.v_scale = real_number(v_scale, "v_scale", low=0.0, low_open=True)
        self.device = as_device(device)
        self.num_pages, self.page_size, self.num_heads, self.head_dim, self.num_layers = sizes
        self.dtype = dtype
        self.kv_layout = kv_layout
        ps, heads = self.page_size, self.num_heads
        inner = (ps, heads) if kv_layout == "NHD" else (heads, ps)
        self.kv_data = zeroed_storage(
            (self.num_layers, self.num_pages, 2, *inner, self.head_dim), dtype, self.device
        )
        self.allocator = PageAllocator(self.num_pages)
        # views made once: the combined tensor and the (K, V) pair of every layer (what
        # attention reads, by layer index, after checking it)
        self._layers = list(self.kv_data.unbind(0))
        self.kv_pairs = [(kv[:, 0], kv[:, 1]) for kv in self._layers]
        self._head_shape = torch.Size((self.num_heads, self.head_dim))
        kernel = self.head_dim in FLASHINFER_APPEND_HEAD_DIMS and dtype in FLASHINFER_APPEND_DTYPES
        self._fi = flashinfer_or_none() if kernel and self.device.type == "cuda" else None
        # whether appends call flashinfer (CUDA, a head_dim and dtype it supports,
        # importable); set it False to scatter with torch instead
        self.use_flashinfer = self._fi is not None
        self._accepted_dtypes = accepted_kv_dtypes(dtype)

    # ------------------------------------------------------------ page pool (seed API)
    def allocate(self, num_pages: int) -> list[int]:
        """Take ``num_pages`` free pages (reference count 1 each); raises NoPageError."""
        return self.allocator.allocate(num_pages).tolist()

    def ref(self, page_indices: PageIds) -> None:
        """Add a reference to each listed page (for sharing a prefix)."""
        self.allocator.ref(page_indices)

    def unref(self, page_indices: PageIds) -> None:
        """Drop a reference per listing; pages reaching zero become free."""
        self.allocator.unref(page_indices)

    release_pages = unref  # the seed's name: pages are freed at zero references

    @property
    def available_pages_count(self) -> int:
        """Free pages in the pool."""
        return self.allocator.available_pages_count

    def check_integrity(self) -> None:
        """Raise AssertionError unless the page pool is consistent."""
        self.allocator.check_integrity()

    # ------------------------------------------------------------------------ storage
    def get_kv_cache(self, layer: int = 0) -> torch.Tensor:
        """One layer's pages as flashinfer's combined ``paged_kv_cache`` tensor (a view).

        Raises:
            ArgumentTypeError: ``layer`` is not an integer. IndexOutOfRangeError: no
            such layer.
        """
        if type(layer) is int and 0 <= layer < self.num_layers:  # the common case, fast
            return self._layers[layer]
        return self._layers[self.checked_layer(layer)]

    def checked_layer(self, layer: object) -> int:
        """``layer`` as an int in ``[0, num_layers)``."""
        return checked_index(layer, "layer", self.num_layers)

    def get_memory_tensors(self, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache)`` of one layer, views shaped
        ``[num_pages, page_size, num_heads, head_dim]`` (NHD) or
        ``[num_pages, num_heads, page_size, head_dim]`` (HND)."""
        self.get_kv_cache(layer)  # validates the index
        return self.kv_pairs[layer]

    @property
    def key_cache(self) -> torch.Tensor:
        """Layer 0's keys, as in the seed."""
        return self.get_memory_tensors(0)[0]

    @property
    def value_cache(self) -> torch.Tensor:
        """Layer 0's values, as in the seed."""
        return self.get_memory_tensors(0)[1]

    def copy_pages(self, src_pages: PageIds, dst_pages: PageIds) -> None:
        """Copy the K/V of ``src_pages`` into ``dst_pages`` in every layer.

        Raises:
            IndexOutOfRangeError: a page id outside the pool (no negative indexing).
            InvalidLengthError: not one destination per source, or a destination twice.
            ArgumentTypeError: ids that are not integers. Nothing is copied.
        """
        src_ids = checked_page_ids(src_pages, self.num_pages, "src_pages")
        dst_ids = checked_page_ids(dst_pages, self.num_pages, "dst_pages")
        if src_ids.size != dst_ids.size or np.unique(dst_ids).size != dst_ids.size:
            raise InvalidLengthError(
                f"copy_pages needs one distinct destination per source, got {src_ids.size} "
                f"sources and destinations {dst_ids[:8].tolist()}"
            )
        src = torch.from_numpy(src_ids).to(self.device)
        dst = torch.from_numpy(dst_ids).to(self.device)
        self.kv_data[:, dst] = self.kv_data[:, src]

    def append_kv(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        flashinfer_data: FlashInferPackedData,
        append_indptr_cpu: Optional[torch.Tensor] = None,
        *,
        layer: int = 0,
    ) -> None:
        """Write new tokens' K/V into their pages, right after each sequence's old tokens.

        Allocate first (``CacheDescriptor.allocate``), then pack the batch: the packed
        page table gives the lengths *after* this append, and token ``j`` of sequence
        ``b`` lands at position ``len_after[b] - append_len[b] + j``.

        Args:
            keys: ``shape: [nnz, num_heads, head_dim]``, the cache's dtype and device.
            values: same shape, dtype and device as ``keys``.
            flashinfer_data: the batch, packed after allocating.
            append_indptr_cpu: ``shape: [batch_size + 1]``, int; row ``b``'s new tokens
                are ``keys[append_indptr[b]:append_indptr[b + 1]]``. May be omitted when
                the batch was packed with ``append_lens``.
            layer: which layer's pages to write.

        On CUDA with flashinfer importable this calls
        ``flashinfer.page.append_paged_kv_cache``; otherwise a pure torch scatter.
        """
        self.get_kv_cache(layer)  # validates the index
        self.check_kv(keys, values)
        # a current batch of this cache costs three attribute reads and two compares
        stamp = getattr(flashinfer_data, "stamp", None)
        if (
            stamp is None
            or stamp.checked_at != stamp.table.clock
            or (stamp.table.allocator is not self.allocator)
        ):
            if not isinstance(flashinfer_data, FlashInferPackedData):
                raise ArgumentTypeError(
                    f"flashinfer_data must be a FlashInferPackedData, got {shown(flashinfer_data)}"
                )
            flashinfer_data.check_current(self.allocator, self.num_pages, "append_kv")
        nnz = keys.shape[0]
        if nnz:
            self.write_pages(layer, keys, values, *self.append_metadata(
                flashinfer_data, append_indptr_cpu, nnz))  # fmt: skip

    def write_pages(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        indices: torch.Tensor,
        indptr: torch.Tensor,
        last_page_len: torch.Tensor,
    ) -> None:
        """Write token ``i`` of ``keys``/``values`` at position ``positions[i]`` of batch row
        ``rows[i]`` of the page table (``indices``, ``indptr``, ``last_page_len``), all
        on the cache's device; unchecked (callers check: :meth:`append_kv`, attention).

        On CUDA with flashinfer importable this calls
        ``flashinfer.page.append_paged_kv_cache``; otherwise a pure torch scatter.
        """
        if keys.dtype != self.dtype:  # an fp8 cache quantizes (only then a call per tensor)
            keys, values = (
                stored(keys, self.dtype, self.k_scale),
                stored(values, self.dtype, self.v_scale),
            )
        if self.use_flashinfer and self._fi is not None:
            self._fi.page.append_paged_kv_cache(
                keys, values, rows, positions, self.kv_pairs[layer], indices, indptr,
                last_page_len, kv_layout=self.kv_layout,
            )  # fmt: skip
            return
        kv = self._layers[layer]
        positions = positions.long()
        page = indices[indptr[rows.long()] + positions // self.page_size].long()
        slot = positions % self.page_size
        if self.kv_layout == "NHD":
            kv[page, 0, slot] = keys
            kv[page, 1, slot] = values
        else:
            kv[page, 0, :, slot] = keys
            kv[page, 1, :, slot] = values

    # ---------------------------------------------------------------------- internals
    def append_metadata(
        self, packed: FlashInferPackedData, append_indptr_cpu: Optional[torch.Tensor], nnz: int
    ) -> tuple[torch.Tensor, ...]:
        """What :meth:`write_pages` takes to append ``nnz`` tokens of ``packed``: rows,
        positions, indices, indptr and last page lengths on this device; the step's own
        when it was packed with its append lengths, else derived here (a batch built by
        hand, or explicit ``append_indptr_cpu``, as the seed passes)."""
        positions, rows = packed.append_positions, packed.append_batch_indices
        if append_indptr_cpu is None and positions is not None and rows is not None:
            if positions.shape[0] != nnz:
                raise TensorSpecError(
                    f"keys hold {nnz} tokens but the batch was packed to append "
                    f"{positions.shape[0]}"
                )
        elif append_indptr_cpu is None and packed.append_indptr is None:
            raise InvalidLengthError(
                "append_kv needs append_indptr_cpu, or a batch packed with append_lens"
            )
        else:
            given = packed.append_indptr if append_indptr_cpu is None else append_indptr_cpu
            host = derived_append(packed, given, nnz, self.page_size)
            rows, positions = upload(self.device, list(host))[0]
        indptr, last = packed.device_indptr, packed.device_last_page_len
        if indptr is None or last is None:  # built by hand
            indptr, last = packed.kv_page_indptr, packed.kv_last_page_len
        metadata = (rows, positions, packed.kv_page_indices, indptr, last)
        if all(t.device == self.device for t in metadata):  # packed for this device
            return metadata
        # packed on the host (no device given) or built by hand: moved here, each call
        return tuple(t.to(self.device, non_blocking=True) for t in metadata)

    def check_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Raise TensorSpecError unless keys/values fit ``[nnz, num_heads, head_dim]`` here."""
        try:  # the common case in a few attribute reads: this runs once per layer per step
            if (
                keys.shape[1:] == self._head_shape
                and values.shape == keys.shape
                and keys.dim() == 3
                and keys.dtype == values.dtype
                and keys.dtype in self._accepted_dtypes
                and keys.device == self.device
                and values.device == self.device
            ):
                return
        except AttributeError:
            pass
        explain_kv(self, keys, values)


def accepted_kv_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes new K/V may have for a cache of ``dtype``: its own, or for a float8
    cache also float16/bfloat16/float32 (quantized on append)."""
    return (dtype, *QUANTIZABLE_DTYPES) if dtype in FP8_DTYPES else (dtype,)


def stored(t: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``t`` as a cache of ``dtype`` stores it: float8 caches hold ``t / scale``, saturated
    to the format's range (a plain cast would turn overflow into NaN; flashinfer would
    not convert at all)."""
    if t.dtype == dtype:
        return t
    limit = torch.finfo(dtype).max
    return (t.float() / scale).clamp_(-limit, limit).to(dtype)


def explain_kv(cache: PagedKVCacheManager, keys: object, values: object) -> None:
    """Raise saying how ``keys``/``values`` differ from ``[nnz, num_heads, head_dim]``
    tensors of ``cache``'s dtype (or one it quantizes) on its device."""
    expected = (cache.num_heads, cache.head_dim)
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {shown(t)}")
        if t.dim() != 3 or tuple(t.shape[1:]) != expected:
            raise TensorSpecError(
                f"{name} must have shape [nnz, {expected[0]}, {expected[1]}], got {list(t.shape)}"
            )
        quantizable = cache.dtype in FP8_DTYPES and t.dtype in QUANTIZABLE_DTYPES
        if t.dtype != cache.dtype and not quantizable:
            also = " (or float16/bfloat16/float32, quantized)" if cache.dtype in FP8_DTYPES else ""
            raise TensorSpecError(f"{name} must have dtype {cache.dtype}{also}, got {t.dtype}")
        if t.device != cache.device:
            raise TensorSpecError(f"{name} must be on {cache.device}, got {t.device}")
    if keys.shape[0] != values.shape[0]:
        raise TensorSpecError(
            f"keys and values must hold the same number of tokens, "
            f"got {keys.shape[0]} and {values.shape[0]}"
        )
    if keys.dtype != values.dtype:
        raise TensorSpecError(f"keys and values differ in dtype: {keys.dtype}, {values.dtype}")


def zeroed_storage(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.zeros(shape)``, or InvalidArgumentError naming the GiB when it does not fit."""
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as error:  # torch's out-of-memory errors
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        raise InvalidArgumentError(
            f"the KV storage {list(shape)} ({nbytes / 2**30:.2f} GiB of {dtype}) "
            f"does not fit on {device}: fewer pages or layers ({error})"
        ) from None
