"""A request's state in the engine: sampling parameters, the sequence, its events and output."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafleet.errors import LorafleetError

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; checked on creation (one-line LorafleetError).

    temperature 0 = greedy; top_k 0 = off; top_p 1 = off. `stop` strings end the sequence
    (the stop string is not part of the text); `stop_token_ids` too, and so does the model's
    EOS unless `ignore_eos`. A `seed` gives the request its own generator (reproducible)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise LorafleetError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise LorafleetError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise LorafleetError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise LorafleetError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise LorafleetError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LorafleetError(f"stop must be non-empty strings, got {list(self.stop)!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise LorafleetError(f"stop_token_ids must be token ids, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


class Status(enum.Enum):
    WAITING = "waiting"  # added, not yet admitted (no KV memory, batch full, adapter loading)
    RUNNING = "running"  # admitted: holds a KV slot and pins its adapter
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenEvent:
    """What a streaming client gets per token: the new token (None on a final event after a
    cancel or error) and the text it completes; text may lag a token (a partial UTF-8 character,
    or what could be the start of a stop string) and is flushed when the request finishes."""

    request_id: int
    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"


@dataclass(frozen=True)
class RequestOutput:
    """A finished request. `token_ids` are the generated ids (a stop id included, as
    transformers' generate returns it); `text` excludes stop ids and stop strings."""

    request_id: int
    adapter: str | None
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One request as the engine tracks it. Identity equality: it is used as a set member."""

    request_id: int
    prompt_ids: list[int]
    adapter: str | None  # None = the base model
    params: SamplingParams
    on_token: Callable[[TokenEvent], None] | None = None
    generated: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    kv_slot: int | None = None  # row of the KV cache while RUNNING
    lora_slot: int = 0  # adapter slot while RUNNING (0 = base)
    num_cached: int = 0  # tokens whose K/V are in the cache
    generator: torch.Generator | None = None  # own RNG when seeded
    text: str = ""  # decoded generated text (stop string cut off once found)
    emitted: int = 0  # characters of `text` already sent to on_token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def last_token(self) -> int:
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            adapter=self.adapter,
            prompt_ids=list(self.prompt_ids),
            token_ids=list(self.generated),
            text=self.text,
            finish_reason=self.finish_reason or "error",
            error=self.error,
        )
