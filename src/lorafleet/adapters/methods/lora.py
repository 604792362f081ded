"""LoRA (PEFT's LoraConfig): W' = W + s B A with s = alpha / r.

On disk PEFT stores `base_model.model.<module>.lora_A.weight` [r, d_in] and
`...lora_B.weight` [d_out, r] (the adapter name is dropped). Served as it is: a LoRA slot with
A, B and s (y = W x + b + s B A x). The parts and serving here are shared by every method saved
in LoRA's form (rsLoRA, DoRA, BiLoRA).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lorafleet.adapters.methods.base import (
    Method,
    ModuleWeights,
    Part,
    PeftOptions,
    SlotEntry,
    lora_scale,
)

if TYPE_CHECKING:  # a type name only: the registry stays light (PEFT is imported on use)
    from peft import LoraConfig

PEFT_TYPE = "LORA"
A = Part("A", "lora_A.weight", lambda d: (d.r, d.d_in))
B = Part("B", "lora_B.weight", lambda d: (d.d_out, d.r))
PARTS = (A, B)


def lora_config(options: PeftOptions, **kw) -> LoraConfig:
    """PEFT's LoraConfig for `options` (`kw` sets the variant's own options)."""
    from peft import LoraConfig

    return LoraConfig(
        r=options.rank,
        lora_alpha=kw.pop("lora_alpha", options.alpha),
        target_modules=list(options.targets),
        lora_dropout=options.dropout,
        task_type="CAUSAL_LM",
        **kw,
    )


def serve_lora(weights: ModuleWeights) -> SlotEntry:
    """A LoRA slot: A [r, d_in], B [d_out, r], s = alpha / r (or / sqrt r with use_rslora)."""
    return SlotEntry(
        weights.parts["A"], weights.parts["B"], lora_scale(weights.config, weights.name)
    )


def _recognises(config: Mapping) -> bool:
    return not config.get("use_dora") and not config.get("use_rslora")


METHOD = Method(
    name="lora",
    help="plain LoRA, scale alpha / r",
    title="LoRA",
    peft_type=PEFT_TYPE,
    parts=PARTS,
    peft_config=lora_config,
    serve=serve_lora,
    delta="s * B @ A",
    recognises=_recognises,
    factored=True,
)
