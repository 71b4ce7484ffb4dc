"""A small generation engine on seqattn (needs transformers): requests in, tokens out."""

from .engine import Engine, EngineStats
from .request import Request, Status
from .sampling import SamplingParams, sample

__all__ = ["Engine", "EngineStats", "Request", "SamplingParams", "Status", "sample"]
