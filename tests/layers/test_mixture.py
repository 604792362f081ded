"""Rows over several adapters: the op against a per-row reference, gates, PEFT's cat merge."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from lorafleet.adapters import adapter_from_model
from lorafleet.layers import MultiLoRAContext, MultiLoRALinear, RowMixture, inject_multilora
from lorafleet.models.tiny import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATHS = [None, "segmented", "gathered"]


class RecordingGate:
    """Per-token weights from the rows' input (softmax of a fixed projection), recording calls."""

    def __init__(self, d_in: int, k: int, wants_deltas: bool = False, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(d_in, k, generator=gen, dtype=torch.float64)
        self.wants_deltas = wants_deltas
        self.calls = []

    def weights(self, x):
        return torch.softmax(x.double() @ self.proj, dim=-1)  # [n, K]

    def __call__(self, layer, x, slots, deltas):
        self.calls.append(
            (layer, tuple(x.shape), slots, None if deltas is None else deltas.clone())
        )
        return self.weights(x)


def _layer(max_slots=3, max_rank=4, seed=0):
    """A float64 layer with slots 1..3 (ranks 4, 2, 1) and the per-slot (A, B, scale)."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(12, 10).double()
    layer = MultiLoRALinear(base, MultiLoRAContext(), max_slots, max_rank, name="blk.q")
    gen, weights = torch.Generator().manual_seed(seed + 1), {}
    for slot, (r, scale) in {1: (4, 0.5), 2: (2, 3.0), 3: (1, 1.5)}.items():
        A = torch.randn(r, 12, generator=gen, dtype=torch.float64)
        B = torch.randn(10, r, generator=gen, dtype=torch.float64)
        layer.set_slot(slot, A, B, scale)
        weights[slot] = (A, B, scale)
    return base, layer, weights


def _delta(weights, slot, x):
    A, B, scale = weights[slot]
    return scale * (x @ A.T) @ B.T


@pytest.mark.parametrize("path", PATHS)
def test_fixed_mixture_rows_next_to_single_and_base_rows(path):
    base, layer, weights = _layer()
    layer.context.path = path
    x = torch.randn(7, 12, dtype=torch.float64)
    slots = [0, 1, 0, 2, 0, 3, 1]  # rows 0, 2, 4 are mixtures (slot 0 in the map)
    mixtures = [
        RowMixture([0, 4], (1, 2), (0.7, -0.4)),
        RowMixture([2], (3, 1, 2), (2.0, 0.5, 1.0)),
    ]
    layer.context.set_slots(slots, mixtures)
    with torch.no_grad():
        got = layer(x)
    expected = base(x).detach()
    for row, s in enumerate(slots):
        if s:
            expected[row] += _delta(weights, s, x[row])
    for mix in mixtures:
        for row in mix.rows:
            for s, w in zip(mix.slots, mix.weights, strict=True):
                expected[row] += w * _delta(weights, s, x[row])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    plan = layer.context.mixture_plan(torch.Size([7]), x.device)
    assert plan.plan.path == (path or "gathered")  # 7 entries over 3 slots: gathered by default
    # The single-adapter rows are bit-for-bit what they are without the mixtures.
    layer.context.set_slots(slots)
    with torch.no_grad():
        alone = layer(x)
    single = torch.tensor(slots) != 0
    assert torch.equal(got[single], alone[single])


@pytest.mark.parametrize("path", PATHS)
def test_one_adapter_at_weight_one_matches_its_slot(path):
    base, layer, _ = _layer()
    layer.context.path = path
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        layer.context.set_slots([2, 0], [RowMixture([1], (2,), (1.0,))])  # per sequence
        got = layer(x)
        layer.context.set_slots([2, 2])
        torch.testing.assert_close(got, layer(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("wants_deltas", [False, True])
def test_gate_is_called_per_layer_with_the_rows_and_its_weights_are_used(path, wants_deltas):
    base, layer, weights = _layer()
    layer.context.path = path
    gate = RecordingGate(12, 2, wants_deltas)
    x = torch.randn(6, 12, dtype=torch.float64)
    rows = [1, 3, 4]
    layer.context.set_slots([1, 0, 0, 0, 0, 2], [RowMixture(rows, (3, 1), gate=gate)])
    with torch.no_grad():
        got = layer(x)
    assert len(gate.calls) == 1
    name, shape, slots, deltas = gate.calls[0]
    assert (name, shape, slots) == ("blk.q", (3, 12), (3, 1))
    w = gate.weights(x[rows])  # [3, 2], different per row
    assert not torch.allclose(w[0], w[1])
    expected = base(x).detach()
    expected[0] += _delta(weights, 1, x[0])
    expected[5] += _delta(weights, 2, x[5])
    for i, row in enumerate(rows):
        expected[row] += w[i, 0] * _delta(weights, 3, x[row]) + w[i, 1] * _delta(weights, 1, x[row])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    if wants_deltas:
        want = torch.stack([_delta(weights, s, x[rows]) for s in (3, 1)], dim=1)  # [n, K, d]
        torch.testing.assert_close(deltas, want, atol=1e-12, rtol=0)
    else:
        assert deltas is None


def test_bad_mixtures_are_refused():
    _, layer, _ = _layer()
    x = torch.randn(3, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="either weights or a gate"):
        RowMixture([0], (1, 2))
    with pytest.raises(ValueError, match="1 weights for 2 mixture slots"):
        RowMixture([0], (1, 2), (1.0,))
    with pytest.raises(ValueError, match=r"mixture rows must be in 0..2"):
        layer.context.set_slots(None, [RowMixture([3], (1,), (0.5,))])
        layer(x)
    with pytest.raises(ValueError, match="slot 4 is out of range"):
        layer.context.set_slots(None, [RowMixture([0], (1, 4), (0.5, 0.5))])
        layer(x)

    def bad_gate(layer, x, slots, deltas):
        return torch.ones(x.shape[0], 3, dtype=x.dtype)

    bad_gate.wants_deltas = False
    with pytest.raises(ValueError, match=r"shape \(2, 3\) at blk.q, expected \(2, 2\)"):
        layer.context.set_slots(None, [RowMixture([0, 1], (1, 2), gate=bad_gate)])
        layer(x)


# --- whole models: the mixture equals PEFT's cat merge, on tiny Llama and Gemma 3 ---


def tiny_gemma(vocab_size: int) -> Gemma3ForCausalLM:
    """A 2-layer, 64-wide Gemma 3 (sliding + full attention), seed 0."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return Gemma3ForCausalLM(config).eval()


MODELS = {"llama": lambda v: tiny_llama(0, vocab_size=v), "gemma3": tiny_gemma}
W = (0.7, -0.4)


@pytest.fixture(scope="module", params=list(MODELS))
def cat_case(request, tokenizer):
    """(family, adapters a and b, PEFT's cat merge of 0.7 a - 0.4 b as a PEFT model and an
    adapter): plain LoRA r=4 (alpha 8) on every linear and r=2 (alpha 6) on attention."""
    make = MODELS[request.param]
    config_a = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    config_b = LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS[:4], task_type="CAUSAL_LM")
    peft_model = get_peft_model(make(len(tokenizer)), config_a, adapter_name="one")
    peft_model.add_adapter("two", config_b)
    randomize_adapter(peft_model, seed=7, scale=0.2)
    a, b = (adapter_from_model(peft_model, adapter_name=n) for n in ("one", "two"))
    peft_model.add_weighted_adapter(["one", "two"], list(W), "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    return make, a, b, peft_model.eval(), adapter_from_model(peft_model, adapter_name="mix")


@torch.no_grad()
def test_mixture_equals_peft_cat_merge(cat_case, tokenizer):
    make, a, b, merged_model, merged = cat_case
    handle = inject_multilora(make(len(tokenizer)), max_slots=3, max_rank=8)
    for slot, adapter in enumerate((a, b, merged), start=1):
        handle.load_slot(slot, adapter)
    ids = torch.tensor([tokenizer("The film was a delight from start to finish.")["input_ids"]] * 3)
    want = merged_model(input_ids=ids[:1]).logits[0]  # [S, V]
    for path in PATHS:
        handle.context.path = path
        with handle.slots([1, 0, 3]):
            alone = handle.model(input_ids=ids).logits
        torch.testing.assert_close(alone[2], want, atol=1e-5, rtol=0)  # the cat adapter, slot 3
        assert (alone[0] - want).abs().max() > 1e-2  # adapter a alone is something else
        with handle.slots([1, 0, 3], [RowMixture([1], (1, 2), W)]):
            got = handle.model(input_ids=ids).logits
        torch.testing.assert_close(got[1], want, atol=1e-5, rtol=0, msg=str(path))
        assert torch.equal(got[0], alone[0]) and torch.equal(got[2], alone[2])
