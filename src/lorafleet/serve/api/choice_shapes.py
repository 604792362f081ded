"""How /v1/completions and /v1/chat/completions shape their choices, chunks and logprobs."""

from __future__ import annotations

from lorafleet.serve.api import generation as gen
from lorafleet.serve.api import structured
from lorafleet.serve.api.choices import Choice, chat_logprobs, completion_logprobs, usage
from lorafleet.serve.api.errors import APIError
from lorafleet.serve.api.responses import (
    ChatChoice,
    ChatChunk,
    ChatCompletion,
    ChatDeltaChoice,
    ChatMessageOut,
    ChatToolCallsMessage,
    Completion,
    CompletionChoice,
    CompletionWithUsage,
    Usage,
    UsageChunk,
)
from lorafleet.serve.sequence import TokenEvent


class Shape:
    """The parts both routes share: a chunk per event that brings text or a logprob, then on
    the last event an error body if it failed and a chunk with the finish reason."""

    object = ""

    def __init__(self, rid: str, created: int, model: str):
        self.rid, self.created, self.model = rid, created, model

    def head(self, choice: Choice) -> list:
        return []

    def delta(self, choice: Choice, text: str, event: TokenEvent | None, reason):
        raise NotImplementedError

    def on_event(self, choice: Choice, event: TokenEvent) -> list:
        pieces = []
        if event.text or (event.logprob is not None and self.wants_logprobs):
            pieces.append(self.delta(choice, event.text, event, None))
        if event.finished:
            reason = event.finish_reason
            if reason == "error":  # mid-stream failure: say so, then end
                pieces.append(gen.failure(choice.stream).body())
            pieces.append(
                self.delta(choice, "", None, reason if reason in ("stop", "length") else "stop")
            )
        return pieces

    def usage(self, choices: list[Choice]) -> Usage:
        return usage(choices)

    def usage_chunk(self, value: Usage) -> UsageChunk:
        return UsageChunk(
            id=self.rid, object=self.object, created=self.created, model=self.model, usage=value
        )


class CompletionShape(Shape):
    """/v1/completions: `logprobs` k in the legacy shape; `echo` puts the prompt (and, with
    logprobs, its per-token logprobs) before the text; max_tokens 0 with echo scores the prompt
    and generates nothing (the engine's one sampled token is dropped)."""

    object = "text_completion"

    def __init__(self, rid, created, model, body, tokenizer, grammar=None):
        super().__init__(rid, created, model)
        self.grammar = grammar  # response_format's (serve/grammar.GrammarSpec), or None
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400,
                "max_tokens 0 is only allowed with echo (score the prompt)",
                code="invalid_request",
                param="max_tokens",
            )
        self.tokenizer, self.echo, self.k = tokenizer, body.echo, body.logprobs
        self.score_only = body.max_tokens == 0
        self.wants_logprobs = self.k is not None and not self.score_only

    def sampling_kw(self) -> dict:
        kw = {"logprobs": self.k, "prompt_logprobs": self.k if self.echo else None}
        kw["grammar"] = self.grammar
        return {**kw, "max_tokens": 1} if self.score_only else kw

    def prefix(self, choice: Choice) -> str:
        return self.tokenizer.decode(choice.prompt_ids) if self.echo else ""

    def piece(self, choice: Choice, text: str, logprobs, reason) -> Completion:
        out = CompletionChoice(
            index=choice.index, text=text, logprobs=logprobs, finish_reason=reason
        )
        return Completion(id=self.rid, created=self.created, model=self.model, choices=[out])

    def prompt_part(self, choice: Choice):
        if self.k is None:
            return None
        return completion_logprobs(self.tokenizer, choice.prompt_logprobs, choice.prompt_ids)

    def head(self, choice: Choice) -> list:
        return (
            [self.piece(choice, self.prefix(choice), self.prompt_part(choice), None)]
            if self.echo
            else []
        )

    def delta(self, choice, text, event, reason):
        if self.score_only:
            return self.piece(choice, "", None, "length" if reason else None)
        logprobs = None
        if event is not None and event.logprob is not None and self.k is not None:
            offset = len(self.prefix(choice)) + len(choice.text) - len(text)
            logprobs = completion_logprobs(
                self.tokenizer, [event.logprob], [event.logprob.token_id], offset
            )
        return self.piece(choice, text, logprobs, reason)

    def on_event(self, choice: Choice, event: TokenEvent) -> list:
        if self.score_only and not event.finished:
            return []
        return super().on_event(choice, event)

    def final_choice(self, choice: Choice) -> CompletionChoice:
        prefix, generated = self.prefix(choice), [] if self.score_only else choice.logprobs
        logprobs = None
        if self.k is not None:
            entries = (list(choice.prompt_logprobs) if self.echo else []) + generated
            ids = (choice.prompt_ids if self.echo else []) + [e.token_id for e in generated]
            logprobs = completion_logprobs(self.tokenizer, entries, ids)
        text = prefix + ("" if self.score_only else choice.text)
        reason = "length" if self.score_only else choice.stream.finish_reason
        return CompletionChoice(
            index=choice.index, text=text, logprobs=logprobs, finish_reason=reason
        )

    def usage(self, choices: list[Choice]) -> Usage:
        value = usage(choices)
        return Usage.of(value.prompt_tokens, 0) if self.score_only else value

    def final(self, choices: list[Choice]) -> CompletionWithUsage:
        return CompletionWithUsage(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=[self.final_choice(c) for c in choices],
            usage=self.usage(choices),
        )


class ChatShape(Shape):
    """/v1/chat/completions: `logprobs: true` (+ `top_logprobs` k) in the chat shape; the
    role comes first, in a delta of its own. With tools in play (`plan`, structured.ToolPlan)
    an answer that is a tool call comes as `tool_calls` with finish_reason "tool_calls"; a
    stream holds such an answer back and sends the call in one delta at its end (in "auto"
    mode only while the text may still be a call: other text streams as usual)."""

    object = "chat.completion.chunk"

    def __init__(self, rid, created, model, body, tokenizer, plan=None, grammar=None):
        super().__init__(rid, created, model)
        self.plan = plan if plan is not None else structured.ToolPlan()
        self.grammar = grammar  # the response_format's or the forced call's, or None
        self.held: dict[int, bool] = {}  # choice index -> its text is held (a possible call)
        if body.max_tokens == 0:
            raise APIError(
                400, "max_tokens must be >= 1", code="invalid_request", param="max_tokens"
            )
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(
                400,
                "top_logprobs needs logprobs: true",
                code="invalid_request",
                param="top_logprobs",
            )
        self.tokenizer = tokenizer
        self.k = (body.top_logprobs or 0) if body.logprobs else None
        self.wants_logprobs = self.k is not None

    def sampling_kw(self) -> dict:
        return {"logprobs": self.k, "grammar": self.grammar}

    def call(self, choice: Choice) -> dict | None:
        """The tool call a finished choice's answer is, or None (text; a cut-off call too)."""
        if self.plan.mode == "none" or choice.stream.finish_reason != "stop":
            return None
        return structured.parse_call(choice.text, self.plan.names)

    def release(self, choice: Choice) -> list:
        """The pieces of every event of `choice` so far, as if none had been held."""
        pieces, each = [], super().on_event
        for event in choice.events:
            pieces += each(choice, event)
        return pieces

    def on_event(self, choice: Choice, event: TokenEvent) -> list:
        if self.plan.mode == "none" or not self.held.get(choice.index, True):
            return super().on_event(choice, event)
        if self.plan.mode == "auto" and not structured.might_be_call(choice.text):
            self.held[choice.index] = False  # plain text after all: send what was held
            return self.release(choice)
        if not event.finished:
            return []
        found = self.call(choice)
        if found is None:
            self.held[choice.index] = False
            return self.release(choice)
        delta = {"tool_calls": [{"index": 0, **structured.tool_call(found)}]}
        return [self.piece(choice, delta, None, None), self.piece(choice, {}, None, "tool_calls")]

    def piece(self, choice: Choice, delta: dict, logprobs, reason) -> ChatChunk:
        out = ChatDeltaChoice(
            index=choice.index, delta=delta, logprobs=logprobs, finish_reason=reason
        )
        return ChatChunk(id=self.rid, created=self.created, model=self.model, choices=[out])

    def head(self, choice: Choice) -> list:
        return [self.piece(choice, {"role": "assistant", "content": ""}, None, None)]

    def delta(self, choice, text, event, reason):
        logprobs = None
        if event is not None and event.logprob is not None and self.k is not None:
            logprobs = chat_logprobs(self.tokenizer, [event.logprob])
        return self.piece(choice, {"content": text} if text else {}, logprobs, reason)

    def final(self, choices: list[Choice]) -> ChatCompletion:
        out = []
        for c in choices:
            message, reason = ChatMessageOut(content=c.text), c.stream.finish_reason
            if (found := self.call(c)) is not None:
                message = ChatToolCallsMessage(tool_calls=[structured.tool_call(found)])
                reason = "tool_calls"
            out.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    logprobs=(
                        chat_logprobs(self.tokenizer, c.logprobs) if self.k is not None else None
                    ),
                    finish_reason=reason,
                )
            )
        return ChatCompletion(
            id=self.rid,
            created=self.created,
            model=self.model,
            choices=out,
            usage=self.usage(choices),
        )
