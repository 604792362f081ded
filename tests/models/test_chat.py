"""models.chat: the one place the chat template is applied (text and token ids agree)."""

from __future__ import annotations

from lorafleet.models.chat import chat_prompt, has_chat_template

MESSAGES = [{"role": "user", "content": "Is the sky blue?"}]


class _FakeTokenizer:
    """Returns what older / newer transformers return, to pin the normalisation."""

    chat_template = "{{ messages }}"

    def __init__(self, ids_as_mapping: bool):
        self.ids_as_mapping = ids_as_mapping

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt
        if tokenize:
            ids = [5, 6, 7]
            return {"input_ids": ids} if self.ids_as_mapping else ids
        return ["<text>"]  # a list, as older versions return for batched input


def test_chat_prompt_normalises_every_return_form():
    for mapping in (True, False):
        assert chat_prompt(_FakeTokenizer(mapping), MESSAGES, tokenize=True) == [5, 6, 7]
    assert chat_prompt(_FakeTokenizer(True), MESSAGES) == "<text>"


def test_has_chat_template():
    assert has_chat_template(_FakeTokenizer(True))
    assert not has_chat_template(None)
    assert not has_chat_template(object())


def test_text_and_ids_agree_on_the_real_tokenizer(tokenizer):
    text = chat_prompt(tokenizer, MESSAGES)
    ids = chat_prompt(tokenizer, MESSAGES, tokenize=True)
    assert isinstance(text, str) and text.endswith("assistant\n")
    assert "Is the sky blue?" in text
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(isinstance(t, int) for t in ids)
