"""Parity with PEFT: its adapters load in lorafleet with the same logits, and ours load in PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits, randomize_adapter
from peft import LoraConfig, MissConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open

from lorafleet.adapters import (
    MethodConfig,
    adapter_from_model,
    load_adapter,
    new_adapter,
    write_adapter,
)
from lorafleet.models import fingerprint
from lorafleet.models.tiny import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CONFIGS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
    "rslora": lambda: LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True, task_type="CAUSAL_LM"
    ),
    "dora": lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM"
    ),
    "bone": lambda: MissConfig(r=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
}
ATOL = 1e-5


def _fresh(tokenizer):
    return tiny_llama(0, vocab_size=len(tokenizer))


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_adapter_loads_in_lorafleet_with_same_logits(method, tokenizer, input_ids, tmp_path):
    base_logits = logits(_fresh(tokenizer), input_ids)
    peft_model = get_peft_model(_fresh(tokenizer), PEFT_CONFIGS[method]())
    randomize_adapter(peft_model)
    peft_model.save_pretrained(tmp_path)  # PEFT's own writer
    reference = logits(PeftModel.from_pretrained(_fresh(tokenizer), tmp_path).eval(), input_ids)

    model = _fresh(tokenizer)
    adapter, ours = load_adapter(tmp_path, model, base_fingerprint=fingerprint(model))
    got = logits(ours, input_ids)

    assert adapter.method == method
    assert (reference - base_logits).abs().max() > 1e-3, "adapter must change the logits"
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "bone"])
def test_lorafleet_adapter_loads_in_peft_with_same_logits(method, tokenizer, input_ids, tmp_path):
    base = _fresh(tokenizer)
    base_fp = fingerprint(base)
    ours = new_adapter(base, MethodConfig(method=method, rank=8, alpha=16))
    randomize_adapter(ours)
    ours.eval()
    expected = logits(ours, input_ids)
    write_adapter(tmp_path, adapter_from_model(ours, base_fingerprint=base_fp))

    peft_model = PeftModel.from_pretrained(_fresh(tokenizer), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, input_ids), expected, atol=ATOL, rtol=0)

    # Same keys and shapes as PEFT writes, and our metadata rides along in the header.
    peft_keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == peft_keys  # noqa: SIM118
        header = f.metadata()
    assert header["format"] == "pt"
    assert json.loads(header["lorafleet"])["base_fingerprint"] == base_fp
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("MISS" if method == "bone" else "LORA")
    assert config.get("use_rslora", False) == (method == "rslora")
    assert sorted(config["target_modules"]) == sorted(TARGETS)  # all block linears by default


def test_rslora_scaling_is_alpha_over_sqrt_r(tokenizer):
    model = new_adapter(_fresh(tokenizer), MethodConfig(method="rslora", rank=16, alpha=32))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(32 / 16**0.5)
    plain = new_adapter(_fresh(tokenizer), MethodConfig(method="lora", rank=16, alpha=32))
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0


def test_defaults_follow_a_note_on_lora(tokenizer):
    model = new_adapter(_fresh(tokenizer), MethodConfig())
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (16, 32)
    assert set(config.target_modules) == set(TARGETS)
    assert "lm_head" not in config.target_modules
