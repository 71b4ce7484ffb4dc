"""A small generation engine on seqattn (needs transformers): requests in, tokens out."""

from .engine import Engine, EngineStats
from .request import Request, Status
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .stats import Preemption

__all__ = [
    "Engine",
    "EngineStats",
    "Preemption",
    "Request",
    "SamplingParams",
    "Scheduler",
    "Status",
    "sample",
]
