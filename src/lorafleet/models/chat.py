"""The tokenizer's chat template, applied in one place (prompt text or token ids)."""

from __future__ import annotations

from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    """True when `tokenizer` exists and carries a chat template."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(
    tokenizer: Any, messages: list[dict], *, tokenize: bool = False, tools: list[dict] | None = None
) -> str | list[int]:
    """`messages` ([{"role", "content"}, ...]) through the chat template with the generation
    prompt added: the text, or (`tokenize`) the template's own token ids, which differ from
    tokenizing the text when the tokenizer adds a BOS. `tools` (OpenAI function specs) go to
    the template's `tools` variable. Template errors propagate."""
    kw = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=tokenize, **kw
    )
    if tokenize:
        # transformers 5 returns a BatchEncoding here; older versions a plain list.
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(t) for t in ids]
    return out if isinstance(out, str) else out[0]  # older versions: a list for batched input
