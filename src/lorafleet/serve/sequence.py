"""A request's state in the engine: sampling parameters, the sequence, its events and output."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from lorafleet.errors import LorafleetError
from lorafleet.serve.grammar import GrammarSpec, Matcher

FINISH_REASONS = ("stop", "length", "cancelled", "error")
# An error's message starts with this when the server failed the request (its forward pass, the
# grammar engine, a bug), not the request itself: the HTTP layer answers 500, not 400.
INTERNAL_ERROR = "internal error: "
MAX_LOGPROBS = 20  # the most top alternatives a request may ask per token (OpenAI's limit)
# Below this temperature sampling is greedy (vLLM's cut-off too): logits / 1e-45 overflow float32
# to inf and the softmax gives NaN, and the limit of sampling as temperature -> 0 is the argmax.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; checked on creation (one-line LorafleetError).

    temperature 0 (or below GREEDY_BELOW) = greedy; top_k 0 = off; top_p 1 = off. `stop`
    strings end the sequence (the stop string is not part of the text); `stop_token_ids` too,
    and so does the model's EOS unless `ignore_eos`. A `seed` gives the request its own
    generator (reproducible).
    `logprobs` k (0..20, None = off): each generated token's log-probability and the k most
    likely alternatives; `prompt_logprobs` k: the same for every prompt token but the first
    (see TokenLogprob for the distribution). Requests that ask for neither pay nothing.
    `grammar` (serve/grammar.py): the tokens are constrained to that JSON grammar, and the
    sequence ends ("stop") when its document is complete, or at max_tokens ("length"); stop
    strings and stop_token_ids do not apply to it (they could cut the document short)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: GrammarSpec | None = None

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
        for what in ("logprobs", "prompt_logprobs"):
            k = getattr(self, what)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise LorafleetError(f"{what} must be an integer in 0..{MAX_LOGPROBS}, got {k!r}")
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise LorafleetError(f"grammar must be a GrammarSpec, got {self.grammar!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


@dataclass(frozen=True)
class Mixture:
    """Several adapters in one request: delta = sum_k weight_k * s_k B_k A_k x, computed per
    row in the batched op (no merged copy; equal to PEFT's `cat` merge of the same list).
    `entries`: (adapter name, weight) pairs, distinct names, finite weights (one-line
    LorafleetError otherwise). `Mixture.of` also takes a list of pairs or a {name: weight} map.
    With a `gate` (a layers.MixtureGate, e.g. MoLE's gates) the weights are computed per row
    and layer by the gate over the adapters in this order (the pairs' weights are unused);
    `name` then labels the mixture."""

    entries: tuple[tuple[str, float], ...]
    gate: object = None
    name: str | None = None

    def __post_init__(self):
        entries = tuple(self.entries)
        if not entries:
            raise LorafleetError("a mixture needs at least one (adapter, weight) pair")
        for entry in entries:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise LorafleetError(f"a mixture entry must be (adapter, weight), got {entry!r}")
            name, weight = entry
            if not isinstance(name, str) or not name.strip():
                raise LorafleetError(f"a mixture adapter name must be a non-empty string: {name!r}")
            if not _is_number(weight):
                raise LorafleetError(f"mixture weight for {name} must be finite, got {weight!r}")
        names = [name for name, _ in entries]
        if len(set(names)) != len(names):
            raise LorafleetError(f"a mixture names an adapter twice: {names}")
        object.__setattr__(self, "entries", tuple((n, float(w)) for n, w in entries))

    @classmethod
    def of(cls, value: Mixture | Iterable | dict) -> Mixture:
        if isinstance(value, Mixture):
            return value
        if isinstance(value, dict):
            return cls(tuple(value.items()))
        return cls(tuple(value))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.entries)

    @property
    def label(self) -> str:
        """The mixture as text, e.g. "a*0.7+b*0.3" (RequestOutput.adapter)."""
        if self.name is not None:
            return self.name
        return "+".join(f"{name}*{weight:g}" for name, weight in self.entries)


def resolve_adapter(spec) -> tuple[str | None, Mixture | None]:
    """(adapter, mixture) for a request's adapter spec: None (the base), a name, a Mixture or
    (name, weight) pairs. A one-adapter mixture at weight 1.0 is that adapter (its exact path)."""
    if spec is None or isinstance(spec, str):
        return spec, None
    mixture = Mixture.of(spec)
    if len(mixture.entries) == 1 and mixture.weights[0] == 1.0 and mixture.gate is None:
        return mixture.names[0], None
    return mixture.label, mixture


def prompt_problem(
    ids: list[int], vocab_size: int, max_seq_len: int, max_batch_tokens: int
) -> str | None:
    """Why an engine with these limits cannot take the prompt `ids` (one line), or None."""
    if not ids:
        return "the prompt is empty"
    if min(ids) < 0 or max(ids) >= vocab_size:
        return f"the prompt has token ids outside the vocabulary (0..{vocab_size - 1})"
    if len(ids) >= max_seq_len:
        return f"the prompt has {len(ids)} tokens; max_seq_len is {max_seq_len}"
    if len(ids) > max_batch_tokens:
        return f"the prompt has {len(ids)} tokens; max_batch_tokens is {max_batch_tokens}"
    return None


def internal_error(message: str) -> str:
    """`message` marked as the server's own failure (INTERNAL_ERROR; is_internal)."""
    return message if is_internal(message) else INTERNAL_ERROR + message


def is_internal(error: str | None) -> bool:
    """True for an error message marked by internal_error: the server failed, not the request."""
    return bool(error) and error.startswith(INTERNAL_ERROR)


class Status(enum.Enum):
    WAITING = "waiting"  # added, not yet admitted (no KV memory, batch full, adapter loading)
    RUNNING = "running"  # admitted: holds a KV slot and pins its adapter
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `k` most likely tokens at its position, best first.

    The distribution is the log-softmax of the model's raw logits at that position (what
    OpenAI and vLLM report): before temperature, top-k and top-p, so a value does not depend
    on how the token was sampled and equals transformers' `log_softmax(logits)`."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) pairs, descending


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
    logprob: TokenLogprob | None = None  # token_id's, when the request asked for logprobs
    # every prompt token's but the first (None for it), on a request's first event, if asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


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
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt id (first None)


@dataclass(eq=False)
class Sequence:
    """One request as the engine tracks it. Identity equality: it is used as a set member."""

    request_id: int
    prompt_ids: list[int]
    adapter: str | None  # None = the base model; a mixture's label for a mixture
    params: SamplingParams
    on_token: Callable[[TokenEvent], None] | None = None
    mixture: Mixture | None = None  # several adapters at once (then `adapter` is its label)
    tenant: str | None = None  # whose fair share it counts against (None: its adapter's)
    generated: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    kv_slot: int | None = None  # row of the KV cache while RUNNING
    lora_slot: int = 0  # adapter slot while RUNNING (0 = base, and for a mixture)
    mix_slots: tuple[int, ...] = ()  # a mixture's adapter slots while RUNNING
    num_cached: int = 0  # tokens whose K/V are in the cache
    # Prefill tokens whose K/V the prefix cache copied into the slot at admission
    # (serve/prefix_cache.py): its prefill runs from there. 0 once the prefill ran.
    prefix_hit: int = 0
    generator: torch.Generator | None = None  # own RNG when seeded
    text: str = ""  # decoded generated text (stop string cut off once found)
    emitted: int = 0  # characters of `text` already sent to on_token
    logprobs: list[TokenLogprob] | None = None  # per generated token, when params ask
    prompt_logprobs: list[TokenLogprob | None] | None = None  # set by the prefill, when asked
    events: int = 0  # events sent to on_token (the first carries prompt_logprobs)
    grammar: Matcher | None = None  # params.grammar's state for this row, set on admission

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters this request needs resident (and pins while running)."""
        if self.mixture is not None:
            return self.mixture.names
        return () if self.adapter is None else (self.adapter,)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def prefill_ids(self) -> list[int]:
        """What its prefill runs over: the prompt, and after a preemption (see Scheduler) the
        tokens it had generated too, whose K/V are recomputed."""
        return self.prompt_ids + self.generated if self.generated else self.prompt_ids

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
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
        )
