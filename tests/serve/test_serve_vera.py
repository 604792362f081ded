"""VeRA served in the same batch as LoRA rows: per-row logits equal PEFT's (1e-5, float32), the
engine's greedy tokens equal transformers + PEFT's, and a VeRA slot mixes like a LoRA slot."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, VeraConfig
from serve_helpers import TARGETS, greedy_matches_peft, peft_reference, tiny_base, written_adapters

from lorafleet.layers import MultiLoRAError, RowMixture, inject_multilora
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import Engine

CONFIGS = {
    "lora4": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
    "vera8": lambda: VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=1),
    "vera4": lambda: VeraConfig(r=4, target_modules=["q_proj", "down_proj"], vera_dropout=0.1),
}


def _randomize(model, seed: int) -> None:
    randomize_adapter(model, seed=seed, scale=0.2)  # LoRA's A / B
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda_" in name:  # b starts at zero: the adapter would be the base
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def vera_adapters(tokenizer, tmp_path_factory):
    """name -> Adapter with random non-zero weights, written and read back as a server would."""
    root = tmp_path_factory.mktemp("vera")
    return written_adapters(tokenizer, root, CONFIGS, lambda m, seed, _: _randomize(m, seed), 70)


@torch.no_grad()
def test_vera_rows_match_peft_next_to_lora_rows(tokenizer, vera_adapters):
    model = tiny_llama(0, vocab_size=len(tokenizer))
    handle = inject_multilora(model, max_slots=3, max_rank=8)
    names = list(CONFIGS)
    for slot, name in enumerate(names, start=1):
        handle.load_slot(slot, vera_adapters[name])
    q = handle.layers["model.layers.0.self_attn.q_proj"]
    assert q.ranks == [0, 4, 8, 4] and not q.ratios and not q.dense  # plain LoRA slots
    assert handle.layers["model.layers.0.self_attn.k_proj"].ranks == [0, 4, 8, 0]
    assert all(handle.mixable(s) for s in (1, 2, 3))

    ids = torch.tensor([tokenizer("The film was a delight from start to finish.")["input_ids"]])
    refs = {
        s: peft_reference(tokenizer, vera_adapters[n] if s else None)(input_ids=ids).logits[0]
        for s, n in enumerate([None, *names])
    }
    for s in (1, 2, 3):  # every adapter moves the logits
        assert (refs[s] - refs[0]).abs().max() > 1e-2, s
    row_slots = [0, 2, 1, 3, 2, 0, 3]
    batch = ids.repeat(len(row_slots), 1)
    want = torch.stack([refs[s] for s in row_slots])
    for path in (None, "segmented", "gathered"):
        handle.context.path = path
        with handle.slots(row_slots):
            got = model(input_ids=batch).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=str(path))

    # A VeRA slot mixes as a LoRA slot: equal weights of one adapter twice are that adapter.
    handle.context.path = None
    mix = RowMixture(rows=[0], slots=[2, 2], weights=[0.5, 0.5])
    with handle.slots([0], [mix]):
        got = model(input_ids=ids).logits[0]
    torch.testing.assert_close(got, refs[2], atol=1e-5, rtol=0)


def test_engine_greedy_parity_for_vera_beside_lora(tokenizer, vera_adapters, prompt_ids):
    engine = Engine(tiny_base(tokenizer), max_slots=3, max_rank=8, max_seq_len=128)
    for name, adapter in vera_adapters.items():
        engine.load_adapter(name, adapter)
    plan = [None, "vera8", "lora4", "vera4", "vera8", "lora4"]
    seen = greedy_matches_peft(engine, tokenizer, vera_adapters, plan, prompt_ids)
    assert len(seen) >= 4  # the adapters differ from each other and the base


def test_vera_without_saved_projections_is_refused_in_one_line(tokenizer, vera_adapters):
    adapter = vera_adapters["vera4"]
    no_projection = type(adapter)(
        {**adapter.config, "save_projection": False},
        {k: t for k, t in adapter.tensors.items() if "vera_lambda_" in k},
    )
    handle = inject_multilora(tiny_llama(0, vocab_size=len(tokenizer)), max_slots=1, max_rank=8)
    with pytest.raises(MultiLoRAError, match="save_projection false") as err:
        handle.load_slot(1, no_projection)
    assert "\n" not in str(err.value)
    with pytest.raises(MultiLoRAError, match=r"rank 8 \(.*\) is above this model's max_rank 4"):
        inject_multilora(tiny_llama(0, vocab_size=len(tokenizer)), max_rank=4).load_slot(
            1, vera_adapters["vera8"]
        )
