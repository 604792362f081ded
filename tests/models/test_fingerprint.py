"""Fingerprints tell bases apart and stay equal across dtypes, reloads and attached adapters."""

from __future__ import annotations

import torch

from lorafleet.adapters import MethodConfig, new_adapter
from lorafleet.models import fingerprint, load_base
from lorafleet.models.tiny import tiny_llama


def test_same_weights_same_fingerprint_other_weights_differ():
    a, b, c = (
        tiny_llama(0, vocab_size=512),
        tiny_llama(0, vocab_size=512),
        tiny_llama(1, vocab_size=512),
    )
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    assert fingerprint(a).startswith("llama-")


def test_shape_change_changes_fingerprint():
    assert fingerprint(tiny_llama(0, vocab_size=512)) != fingerprint(tiny_llama(0, vocab_size=513))


def test_dtype_and_attached_adapter_do_not_change_fingerprint():
    model = tiny_llama(0, vocab_size=512)
    fp = fingerprint(model)
    assert fingerprint(tiny_llama(0, vocab_size=512).to(torch.bfloat16)) == fp
    assert fingerprint(new_adapter(model, MethodConfig(method="bone", rank=8))) == fp


def test_loaded_dir_has_the_fingerprint_of_the_saved_model(tiny_base_dir, tokenizer):
    loaded = load_base(str(tiny_base_dir))
    assert loaded.source.kind == "dir" and not loaded.from_cache
    assert loaded.fingerprint == fingerprint(tiny_llama(0, vocab_size=len(tokenizer)))
    assert load_base(str(tiny_base_dir), dtype=torch.bfloat16).fingerprint == loaded.fingerprint
