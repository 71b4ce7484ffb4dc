"""A small generation engine on seqattn (needs transformers): requests in, tokens out."""

from .engine import Engine, EngineStats
from .headwise_store import HeadwiseStore
from .request import Request, Status
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .stats import Preemption
from .store import PagedStore, SequenceStore

__all__ = [
    "Engine",
    "EngineStats",
    "HeadwiseStore",
    "PagedStore",
    "Preemption",
    "Request",
    "SamplingParams",
    "Scheduler",
    "SequenceStore",
    "Status",
    "sample",
]
