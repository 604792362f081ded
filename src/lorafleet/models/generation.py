"""Plain text generation with a base (or adapted) model through transformers' generate."""

from __future__ import annotations

import torch

from lorafleet.models.chat import chat_prompt, has_chat_template


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids for a prompt, wrapped in the tokenizer's chat template when it has one."""
    if chat and has_chat_template(tokenizer):
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}], tokenize=True)
    return tokenizer(prompt)["input_ids"]


@torch.inference_mode()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_tokens: int = 128,
    chat: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """Generate a reply; greedy when temperature is 0. Returns only the new text."""
    ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)], device=model.device)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
