"""seqattn: a sequence-level view of a paged KV cache, packed for flashinfer.

Allocate, extend, fork, truncate and release *sequences*; seqattn handles pages,
reference counts and prefix sharing, and packs the CSR page tables flashinfer's
paged kernels take. A sequence's KV moves to another cache, in one process or
between ranks (:mod:`seqattn.migration`, :mod:`seqattn.migration_p2p`).
"""

from .allocator import PageAllocator
from .attention import PagedAttention
from .descriptor import CacheDescriptor, SequenceData
from .errors import (
    ArgumentTypeError,
    DuplicateSequenceError,
    FlashInferUnavailableError,
    IndexOutOfRangeError,
    InvalidArgumentError,
    InvalidLengthError,
    MissingDependencyError,
    NoPageError,
    PageStateError,
    RankMismatchError,
    SeqAttnError,
    SequenceExistsError,
    StaleBatchError,
    TensorSpecError,
    UnknownSequenceError,
)
from .head_ids import HeadIDGenerator
from .migration import SequenceKV, export_sequence, import_sequence
from .migration_p2p import recv_sequence, send_sequence
from .packed_data import FlashInferPackedData
from .prefix_cache import PrefixCache, PrefixCacheStats
from .shared_prefix import SharedPrefix
from .storage import PagedKVCacheManager

__all__ = [
    "ArgumentTypeError",
    "CacheDescriptor",
    "DuplicateSequenceError",
    "FlashInferPackedData",
    "FlashInferUnavailableError",
    "HeadIDGenerator",
    "IndexOutOfRangeError",
    "InvalidArgumentError",
    "InvalidLengthError",
    "MissingDependencyError",
    "NoPageError",
    "PageAllocator",
    "PageStateError",
    "PagedAttention",
    "PagedKVCacheManager",
    "PrefixCache",
    "PrefixCacheStats",
    "RankMismatchError",
    "SeqAttnError",
    "SequenceData",
    "SequenceExistsError",
    "SequenceKV",
    "SharedPrefix",
    "StaleBatchError",
    "TensorSpecError",
    "UnknownSequenceError",
    "export_sequence",
    "import_sequence",
    "recv_sequence",
    "send_sequence",
]

__version__ = "0.1.0"
