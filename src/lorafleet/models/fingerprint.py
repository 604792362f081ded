"""A base model's fingerprint: architecture + parameter shapes + a hash of a few weight slices."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lorafleet.adapters.lora_keys import base_name

# How many leading elements of each sampled tensor enter the hash: enough to tell two
# trainings or two checkpoints apart, small enough to stay well under a millisecond.
SAMPLE_ELEMENTS = 4096


def _bf16_bytes(t: torch.Tensor) -> bytes:
    # Hash bf16-rounded values so the same weights loaded as fp32, fp16 or bf16 agree.
    flat = t.detach().flatten()[:SAMPLE_ELEMENTS].to("cpu", torch.bfloat16)
    return flat.view(torch.int16).numpy().tobytes()


def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The base model's own parameters under their own names, also when PEFT has wrapped it:
    adapter weights are left out and PEFT's `base_model.model.` / `.base_layer` are undone."""
    adapter_params: set[int] = set()
    for module in model.modules():
        for attr in getattr(module, "adapter_layer_names", ()):  # PEFT's tuner layers
            adapter_params.update(id(p) for p in getattr(module, attr).parameters())
    params = []
    for name, p in model.named_parameters():  # lists a tied weight once
        if id(p) in adapter_params:
            continue
        params.append((base_name(name), p))
    return params


def fingerprint(model: nn.Module) -> str:
    """`<model_type>-<16 hex>`; equal for the same weights whatever dtype or file they came from,
    and whether or not adapters are attached."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or model.__class__.__name__.lower()
    params = _base_parameters(model)
    digest = hashlib.sha256(model_type.encode())
    for name, p in params:
        digest.update(f"{name}:{tuple(p.shape)};".encode())
    if params:
        picks = sorted({0, len(params) // 2, len(params) - 1})
        for i in picks:
            digest.update(_bf16_bytes(params[i][1]))
    return f"{model_type}-{digest.hexdigest()[:16]}"
