"""Serving: the batched multi-adapter engine (continuous batching, KV cache, sampling)."""

from lorafleet.serve.engine import Engine
from lorafleet.serve.kv_cache import KVCache
from lorafleet.serve.registry import AdapterRegistry
from lorafleet.serve.runners import RUNNERS, LlamaRunner, ModelRunner, runner_class
from lorafleet.serve.scheduler import AdapterGate, Batch, Scheduler
from lorafleet.serve.sequence import (
    FINISH_REASONS,
    RequestOutput,
    SamplingParams,
    Sequence,
    Status,
    TokenEvent,
)
from lorafleet.serve.slot_table import AdapterSource, SlotTable

__all__ = [
    "FINISH_REASONS",
    "RUNNERS",
    "AdapterGate",
    "AdapterRegistry",
    "AdapterSource",
    "Batch",
    "Engine",
    "KVCache",
    "LlamaRunner",
    "ModelRunner",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "Sequence",
    "SlotTable",
    "Status",
    "TokenEvent",
    "runner_class",
]
