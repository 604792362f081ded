"""adapters.lora_keys: PEFT's tensor names, per-module rank/alpha and scale, checked against
PEFT's own LoraLayer.r / .scaling on a tiny model (so the contract is proven, not assumed)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from lorafleet.adapters import (
    PEFT_PREFIX,
    LoraKeyError,
    base_name,
    base_weight_name,
    is_adapter_param,
    lora_pairs,
    module_alpha,
    module_rank,
    module_scale,
    peft_key,
    split_key,
    strip_prefix,
    uniform_scale,
)
from lorafleet.adapters.format import json_ready
from lorafleet.models.tiny import tiny_llama

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def test_split_key_names_every_part_and_rejects_the_rest():
    assert split_key(f"{PEFT_PREFIX}{Q}.lora_A.weight") == (Q, "A")
    assert split_key(f"{PEFT_PREFIX}{Q}.lora_B.weight") == (Q, "B")
    assert split_key(f"{PEFT_PREFIX}{Q}.lora_magnitude_vector") == (Q, "lora_magnitude_vector")
    assert split_key(f"{PEFT_PREFIX}{Q}.miss_block") == (Q, "miss_block")
    assert split_key(f"{Q}.lora_A.weight") is None  # no PEFT prefix
    assert split_key(f"{PEFT_PREFIX}model.embed_tokens.weight") is None  # modules_to_save copy
    assert split_key(f"{PEFT_PREFIX}{Q}.lora_A.default.weight") is None  # in-memory name


@pytest.mark.parametrize("which", ["A", "B", "lora_magnitude_vector", "miss_block"])
def test_peft_key_round_trips_through_split_key(which):
    key = peft_key(Q, which)
    assert key.startswith(PEFT_PREFIX)
    assert split_key(key) == (Q, which)


def test_peft_key_refuses_an_unknown_part():
    with pytest.raises(LoraKeyError, match="unknown LoRA tensor part 'C'"):
        peft_key(Q, "C")


def test_prefix_helpers():
    assert strip_prefix(f"{PEFT_PREFIX}{Q}") == Q
    assert strip_prefix(Q) == Q
    assert base_name(f"{PEFT_PREFIX}{Q}.base_layer.weight") == f"{Q}.weight"
    assert base_weight_name(f"{PEFT_PREFIX}{Q}") == base_weight_name(Q) == f"{Q}.weight"
    assert is_adapter_param(f"{PEFT_PREFIX}{Q}.lora_A.default.weight")
    assert is_adapter_param(f"{PEFT_PREFIX}{Q}.miss_block.default")
    assert not is_adapter_param(f"{PEFT_PREFIX}{Q}.base_layer.weight")


def _tensors(*modules: str, parts=("A", "B")) -> dict:
    return {
        peft_key(m, p): torch.full((1,), float(i)) for i, m in enumerate(modules) for p in parts
    }


def test_lora_pairs_pairs_a_with_b_in_first_seen_order():
    tensors = _tensors(V, Q)
    pairs = lora_pairs(tensors)
    assert list(pairs) == [V, Q]
    assert pairs[V] == (tensors[peft_key(V, "A")], tensors[peft_key(V, "B")])


@pytest.mark.parametrize("missing", ["A", "B"])
def test_lora_pairs_needs_both_halves(missing):
    tensors = _tensors(Q, V)
    del tensors[peft_key(V, missing)]
    other = "B" if missing == "A" else "A"
    with pytest.raises(LoraKeyError, match=f"^{V} has only {other}; LoRA needs A and B$"):
        lora_pairs(tensors)


def test_lora_pairs_strict_refuses_other_tensors_and_lenient_skips_them():
    tensors = {**_tensors(Q), peft_key(Q, "lora_magnitude_vector"): torch.ones(1)}
    with pytest.raises(LoraKeyError, match="lora_magnitude_vector is not a LoRA A/B weight"):
        lora_pairs(tensors)
    assert list(lora_pairs(tensors, strict=False)) == [Q]


def test_rank_and_alpha_fall_back_to_r_and_lora_alpha():
    config = {"r": 4, "lora_alpha": 12, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {}}
    assert module_rank(config, Q) == 4
    assert module_rank(config, V) == 2
    assert module_rank(config, f"{PEFT_PREFIX}{V}") == 2  # a prefixed name works too
    assert module_alpha(config, Q) == 12.0
    assert module_scale(config, Q) == 3.0
    assert module_scale(config, V) == 6.0
    assert module_scale({"r": 16, "lora_alpha": 32, "use_rslora": True}, Q) == 8.0
    # PEFT's pattern keys match whole name components: "proj" is not a suffix of "q_proj".
    assert module_rank({"r": 4, "rank_pattern": {"proj": 2}}, Q) == 4


def test_uniform_scale_refuses_patterns():
    assert uniform_scale({"r": 4, "lora_alpha": 8}) == 2.0
    with pytest.raises(LoraKeyError, match="different scales"):
        uniform_scale({"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": 4}})


PEFT_CASES = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6, "proj": 3},
        alpha_pattern={
            "v_proj": 3,
            "model.layers.0.self_attn.k_proj": 5,
            r"layers\.1\.self_attn\.o_proj": 7,
        },
    ),
    "rslora_patterns": dict(
        r=8,
        lora_alpha=4,
        use_rslora=True,
        rank_pattern={"o_proj": 2},
        alpha_pattern={"down_proj": 9},
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # PEFT warns
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_rank_alpha_and_scale_match_peft_lora_layers(case):
    torch.manual_seed(0)
    peft_config = LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **PEFT_CASES[case])
    model = get_peft_model(tiny_llama(0, vocab_size=256), peft_config)
    config = json_ready(model.peft_config["default"].to_dict())  # as adapter_config.json reads
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 2 * len(TARGETS)
    scales = set()
    for name, layer in layers.items():
        module = strip_prefix(name)
        assert module_rank(config, module) == layer.r["default"], module
        assert module_rank(config, module) == layer.lora_A["default"].weight.shape[0], module
        assert module_alpha(config, module) == layer.lora_alpha["default"], module
        assert math.isclose(module_scale(config, module), layer.scaling["default"]), module
        scales.add(layer.scaling["default"])
    # The pattern cases give modules different scales, so a lookup that ignored them would fail.
    assert len(scales) > 1 if "patterns" in case else len(scales) == 1
