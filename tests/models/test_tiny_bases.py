"""The named tiny bases: one per engine family, built in memory, the same in every process."""

from __future__ import annotations

import pytest
import torch

from lorafleet.errors import LorafleetError
from lorafleet.models import load_base
from lorafleet.models.sources import TINY
from lorafleet.models.tiny_bases import BUILDERS, build_tiny_base
from lorafleet.serve.runners import RUNNERS


def test_every_tiny_base_has_a_builder_and_a_runner():
    assert set(TINY.values()) == set(BUILDERS)
    assert set(BUILDERS) <= set(RUNNERS)


@pytest.mark.parametrize("name", [n for n in TINY if n != "tiny"])
def test_tiny_base_loads_as_its_family(name):
    base = load_base(name)
    assert base.source.kind == "tiny"
    assert base.model.config.model_type == TINY[name]
    assert base.fingerprint == load_base(name).fingerprint  # same seed, same weights
    assert base.model.config.vocab_size == len(base.tokenizer)
    chat = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "hi" in chat
    assert load_base(name, dtype="bfloat16").model.dtype == torch.bfloat16


def test_an_unknown_family_is_one_line():
    with pytest.raises(LorafleetError, match="no tiny base for family 'gpt2'"):
        build_tiny_base("gpt2")
