"""Response bodies of the HTTP API (pydantic), beside the request bodies in schemas.py.

Field order is the wire order. Optional keys that some answers lack are subclasses (never a
null field), so every body keeps today's exact keys; lists of a base type serialize their items
as what they are (`SerializeAsAny`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, SerializeAsAny


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class AdapterCard(ModelCard):
    parent: str
    root: str


class MoleCard(AdapterCard):
    experts: list[str]  # a MoLE's experts, in its gates' order


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SerializeAsAny[ModelCard]]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: per token its text, logprob and top alternatives
    ({text: logprob}); null logprob and top_logprobs for an echoed prompt's first token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    """OpenAI's chat logprobs: one entry per generated token."""

    content: list[TokenLogprobOut]
    refusal: None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class ClassifyChoice(CompletionChoice):
    class_probs: dict  # labels, probs, method, ... (the classifier's answer)


class Completion(BaseModel):
    """A /v1/completions answer, or one of its stream chunks (then without usage)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[SerializeAsAny[CompletionChoice]]


class CompletionWithUsage(Completion):
    usage: Usage


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatToolCallsMessage(ChatMessageOut):
    """An answer that is a tool call: no content, `tool_calls` in OpenAI's shape ({"id",
    "type": "function", "function": {"name", "arguments": JSON text}})."""

    content: str | None = None
    tool_calls: list[dict]


class ChatChoice(BaseModel):
    index: int = 0
    message: SerializeAsAny[ChatMessageOut]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDeltaChoice(BaseModel):
    index: int = 0
    # {"role", "content"} first, then {"content"} (or {"tool_calls": [...]}), {} at the end
    delta: dict[str, str | list[dict]]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatDeltaChoice]


class UsageChunk(BaseModel):
    """The last stream chunk when stream_options.include_usage: no choices, the usage."""

    id: str
    object: str
    created: int
    model: str
    choices: list = []
    usage: Usage


class GenerateDetails(BaseModel):
    finish_reason: str | None
    generated_tokens: int
    prompt_tokens: int


class StreamToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None  # the raw log-softmax of the token (TGI's figure)
    special: bool = False


class GenerateTokenDetails(GenerateDetails):
    """/generate's details when the request asks `details: true` (TGI): every token."""

    prefill: list = []
    tokens: list[StreamToken]


class Generated(BaseModel):
    generated_text: str
    details: SerializeAsAny[GenerateDetails]


class GenerateEvent(BaseModel):
    """One /generate_stream event; the last carries generated_text and details."""

    token: StreamToken | None
    generated_text: str | None
    details: GenerateDetails | None


class GenerateFailed(GenerateEvent):
    error: str


class AdapterInfo(BaseModel):
    name: str
    state: str | None  # a tier (resident, cpu, disk, ...), failed, available or unavailable
    private_to: str | None
    kind: str = "adapter"  # adapter | calibrated | mole | change | unknown (a stray entry)
    reason: str | None = None  # why it cannot be served now (unavailable, failed)


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    stats: dict


class AdapterAdded(BaseModel):
    name: str
    path: str
    added: bool = True


class AdapterDeleted(BaseModel):
    name: str
    deleted: bool = True
