"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import torch


def randomize_adapter(model, seed: int = 123, scale: float = 0.1) -> None:
    """Give every adapter parameter random values, so the adapter changes the logits
    (a zero-initialised B would make any parity test pass trivially)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "miss_block")):
                if "magnitude" in name:
                    p.mul_(1.0 + scale * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(scale * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def logits(model, input_ids):
    return model(input_ids=input_ids).logits


def write_random_lora(
    base, path, seed: int, targets=("q_proj", "v_proj", "o_proj"), scale: float = 0.2
) -> None:
    """A rank-4 PEFT LoRA of `base` (a LoadedBase) on `targets` with random A and B (seeded),
    written as a lorafleet adapter at `path`."""
    import copy

    from peft import LoraConfig, get_peft_model

    from lorafleet.adapters import adapter_from_model, write_adapter

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base.model), config)
    randomize_adapter(model, seed=seed, scale=scale)
    write_adapter(path, adapter_from_model(model, base_fingerprint=base.fingerprint))
