"""Request bodies of the HTTP API (pydantic): OpenAI's completions and chat, LoRAX's generate.

Unknown fields are accepted and ignored (clients send extras); known fields of the wrong type or
out of range are a 400 naming the field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_TOKENS_CAP = 1_000_000  # beyond any context: larger is a typo, refused before the context check
# torch takes 64-bit seeds and k; larger ints would overflow inside the sampler (a 500, not a 400)
Seed = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
TopK = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
Stop = str | Annotated[list[str], Field(max_length=16)] | None
MAX_N_CAP = 128  # choices per request; the server's --max-n (default 8) is below it
MAX_PROMPTS = 32  # prompts in one /v1/completions batch
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    # 0 only with /v1/completions' echo (score the prompt, generate nothing); the route checks
    max_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS_CAP)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: Stop = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N_CAP)] | None = None  # --max-n is below
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)


Weight = Annotated[float, Field(allow_inf_nan=False)]
MAX_PARTS = 64  # a hard cap on any mixture's length; the server's --max-mixture is below it


class AdapterWeight(_Body):
    """One part of a mixture: `{"name": "sst2", "weight": 0.7}` (weight 1 by default)."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    weight: Weight = 1.0


class JsonSchemaSpec(_Body):
    """OpenAI's `response_format.json_schema`: a name, the schema, `strict` (always enforced:
    the grammar never generates what the schema does not allow)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Annotated[str, Field(max_length=256)] | None = None
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    """`response_format`: OpenAI's {"type": "text" | "json_object" | "json_schema",
    "json_schema": {...}}, and LoRAX's {"type": "json_object", "schema": {...}}."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema_: dict | bool | None = Field(None, alias="schema")  # LoRAX's json_object + schema


class FunctionSpec(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments (an object)
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


MAX_TOOLS = 128  # OpenAI's limit


class _Adapters(_Sampling):
    # lorafleet extension: a mixture of adapters per request (`model` = the base or one of them)
    adapters: Annotated[list[AdapterWeight], Field(min_length=1, max_length=MAX_PARTS)] | None = (
        None
    )
    # lorafleet extension: MoLE experts to drop (the rest renormalised), `model` being a MoLE
    mask: Annotated[list[str], Field(max_length=MAX_PARTS)] | None = None


class CompletionRequest(_Adapters):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: (
        str
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[
            list[Annotated[list[StrictInt], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_PROMPTS),
        ]
    )
    echo: StrictBool = False
    logprobs: TopLogprobs | None = None  # top alternatives per token (legacy shape)
    response_format: ResponseFormat | None = None  # vLLM's extension of /v1/completions
    # lorafleet extension: score these labels instead of generating (Laplace-LoRA probabilities
    # for a calibrated adapter); the answer's choice carries `class_probs`.
    class_choices: (
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2, max_length=32)]
        | None
    ) = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Adapters):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # accepted; one call per choice is made


class MergedAdapters(_Body):
    """LoRAX's per-request merge: weights default to 1 each; density and the sign method are
    for ties / dare_*."""

    ids: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256)]],
        Field(min_length=1, max_length=MAX_PARTS),
    ]
    weights: Annotated[list[Weight], Field(max_length=MAX_PARTS)] | None = None
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: Annotated[float, Field(gt=0, le=1)] = 1.0
    majority_sign_method: Literal["total", "frequency"] = "total"


class GenerateParameters(_Body):
    adapter_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    max_new_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] = 20
    temperature: Annotated[float, Field(ge=0, le=100)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: TopK | None = None
    do_sample: StrictBool = False
    seed: Seed | None = None
    stop: Annotated[list[str], Field(max_length=16)] = []
    merged_adapters: MergedAdapters | None = None
    # lorafleet's extension: experts of a MoLE adapter_id to drop (as the OpenAI routes' mask).
    mask: Annotated[list[str], Field(max_length=MAX_PARTS)] | None = None
    response_format: ResponseFormat | None = None  # LoRAX: {"type": "json_object", "schema"}


class GenerateRequest(_Body):
    inputs: Annotated[str, Field(min_length=1)]
    parameters: GenerateParameters = GenerateParameters()


class AddAdapter(_Body):
    name: str
    path: str
