"""Prompt templates and the chat-template wrapper shared by user files and built-in tasks.

Every templated task has two forms: a chat form (the user message goes through the tokenizer's
chat template, the target is the bare answer, e.g. "positive") and a plain form for tokenizers
without a template or `chat=False` (text ending in "Label:"/"Answer:", the target prefixed by a
space, e.g. " positive", so it tokenises as it would in running text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafleet.data.examples import DataError
from lorafleet.models.chat import chat_prompt, has_chat_template

# Labelled rows ({"text", "label"}): the options are the file's distinct labels.
LABELLED_CHAT = "{text}\n\nReply with one label from: {options}."
LABELLED_PLAIN = "{text}\nLabel:"
# Multiple-choice rows ({"question", "choices", "answer"}); options are listed one per line.
CHOICE_CHAT = "{question}\nOptions:\n{options}\nReply with the correct option, exactly as written."
CHOICE_PLAIN = "Question: {question}\nOptions:\n{options}\nAnswer:"


def render_chat(tokenizer: Any, messages: list[dict], where: str) -> str:
    """The prompt before an assistant reply: `messages` through the chat template."""
    try:
        return chat_prompt(tokenizer, messages)
    except Exception as exc:  # jinja raises TemplateError, some templates raise their own
        raise DataError(f"{where}: the tokenizer's chat template failed ({exc})") from exc


@dataclass
class Prompter:
    """Turns a (user message, plain prompt) pair into the prompt text, chat or plain."""

    tokenizer: Any
    chat: bool  # already resolved: chat was asked for AND the tokenizer has a template

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, chat: bool) -> Prompter:
        return cls(tokenizer, bool(chat) and has_chat_template(tokenizer))

    def prompt(self, user_message: str, plain: str, where: str = "") -> str:
        if self.chat:
            return render_chat(self.tokenizer, [{"role": "user", "content": user_message}], where)
        return plain

    def answer(self, text: str) -> str:
        """A target or choice: bare after a chat template, space-prefixed after plain text."""
        return text if self.chat else " " + text


def option_lines(choices: tuple[str, ...] | list[str]) -> str:
    return "\n".join(f"- {c}" for c in choices)
