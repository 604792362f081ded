"""DoRA (PEFT's LoraConfig(use_dora=True), its DoraLinearLayer): LoRA plus a magnitude vector.

On disk: LoRA's A and B plus `base_model.model.<module>.lora_magnitude_vector` m [d_out]. In
eval mode y = r_vec * (W x + s B A x) + b with the per-output-row ratio
r_vec = m / ||W + s B A||_row: [d_out] (PEFT detaches the norm, which changes no value).
Served: r_vec depends only on the adapter and W, so it is computed once at load; the row's LoRA
term goes through the shared A / B slots as for LoRA and the ratio is applied to that row's
output afterwards (memory d_out per layer). A DoRA slot cannot be part of a mixture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lorafleet.adapters.methods import lora
from lorafleet.adapters.methods.base import (
    Method,
    ModuleWeights,
    Part,
    PeftOptions,
    SlotEntry,
    lora_scale,
)

if TYPE_CHECKING:  # a type name only: the registry stays light (torch is imported on use)
    from torch import Tensor

MAGNITUDE = Part("lora_magnitude_vector", "lora_magnitude_vector", lambda d: (d.d_out,))


def dora_ratio(W: Tensor, A: Tensor, B: Tensor, scale: float, magnitude: Tensor) -> Tensor:
    """m / ||W + s B A|| over each output row (PEFT's get_weight_norm, dim=1): [d_out]."""
    import torch

    with torch.no_grad():
        lora_weight = (B @ A).to(W.dtype)  # [d_out, d_in]
        norm = torch.linalg.norm(W + scale * lora_weight, dim=1).to(W.dtype)
        return magnitude.to(W.dtype) / norm


def serve_dora(weights: ModuleWeights) -> SlotEntry:
    """LoRA's slot plus the per-row ratio m / ||W + s B A||_row."""
    W = weights.weight
    A, B = weights.parts["A"].to(W), weights.parts["B"].to(W)
    scale = lora_scale(weights.config, weights.name)
    magnitude = weights.parts[MAGNITUDE.name].to(W)
    return SlotEntry(A, B, scale, ratio=dora_ratio(W, A, B, scale, magnitude))


def _peft_config(options: PeftOptions):
    return lora.lora_config(options, use_dora=True)


def _recognises(config: Mapping) -> bool:
    return bool(config.get("use_dora"))


METHOD = Method(
    name="dora",
    help="LoRA plus a trained magnitude per output row (DoRA)",
    title="DoRA",
    peft_type=lora.PEFT_TYPE,
    parts=(*lora.PARTS, MAGNITUDE),
    peft_config=_peft_config,
    serve=serve_dora,
    delta="m (W + s B A) / ||W + s B A||_row - W, which depends on the base weight's row norms",
    recognises=_recognises,
)
