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
