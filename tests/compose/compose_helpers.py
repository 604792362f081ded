"""Helpers for the compose tests: random PEFT adapters on the tiny Llama, PEFT's exact deltas."""

from __future__ import annotations

import torch
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from lorafleet.adapters import adapter_from_model, attach
from lorafleet.models.tiny import tiny_llama


def tiny(tokenizer):
    return tiny_llama(0, vocab_size=len(tokenizer))


def make_adapter(tokenizer, seed: int, **lora):
    """A LoRA adapter (LoraConfig kwargs) with random non-zero weights on the tiny Llama."""
    lora.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    config = LoraConfig(task_type="CAUSAL_LM", **lora)
    model = get_peft_model(tiny(tokenizer), config)
    randomize_adapter(model, seed=seed, scale=0.3)
    adapter = adapter_from_model(model)
    adapter.tensors = {k: v.detach().clone() for k, v in adapter.tensors.items()}
    return adapter


def peft_deltas(tokenizer, adapter) -> dict[str, torch.Tensor]:
    """{base weight name: delta} as PEFT's own LoraLayer.get_delta_weight computes it."""
    model = attach(tiny(tokenizer), adapter)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = module.get_delta_weight("default").detach().double()
    return out


@torch.no_grad()
def exact_model(tokenizer, adapters, weights):
    """The base with W + sum_i w_i s_i B_i A_i folded in, from PEFT's own per-adapter deltas."""
    model = tiny(tokenizer)
    params = dict(model.named_parameters())
    for adapter, w in zip(adapters, weights, strict=True):
        for name, delta in peft_deltas(tokenizer, adapter).items():
            params[name].add_((w * delta).to(params[name].dtype))
    return model


@torch.no_grad()
def logits_of(model, input_ids):
    return model(input_ids=input_ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def merged_logits(tokenizer, adapter, input_ids):
    return logits_of(attach(tiny(tokenizer), adapter), input_ids)
