"""rsLoRA (rank-stabilised LoRA, PEFT's LoraConfig(use_rslora=True)): W' = W + s B A with
s = alpha / sqrt(r), so higher ranks keep learning. Saved and served as LoRA with that scale."""

from __future__ import annotations

from collections.abc import Mapping

from lorafleet.adapters.methods import lora
from lorafleet.adapters.methods.base import Method, PeftOptions


def _peft_config(options: PeftOptions):
    return lora.lora_config(options, use_rslora=True)


def _recognises(config: Mapping) -> bool:
    return bool(config.get("use_rslora")) and not config.get("use_dora")


METHOD = Method(
    name="rslora",
    help="rank-stabilised LoRA, scale alpha / sqrt(r)",
    title="rsLoRA",
    peft_type=lora.PEFT_TYPE,
    parts=lora.PARTS,
    peft_config=_peft_config,
    serve=lora.serve_lora,
    delta="s * B @ A",
    recognises=_recognises,
    factored=True,
)
