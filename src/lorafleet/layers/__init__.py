"""Torch modules PEFT lacks: the stacked multi-adapter linear (SGMV/BGMV)."""

from lorafleet.layers.multilora import (
    SEGMENT_MIN_ROWS_PER_SLOT,
    MultiLoRAContext,
    MultiLoRALinear,
    SlotPlan,
    choose_path,
    lora_delta,
    lora_delta_gathered,
    lora_delta_segmented,
    plan_rows,
)
from lorafleet.layers.slots import MultiLoRAError, MultiLoRAModel, inject_multilora

__all__ = [
    "SEGMENT_MIN_ROWS_PER_SLOT",
    "MultiLoRAContext",
    "MultiLoRAError",
    "MultiLoRALinear",
    "MultiLoRAModel",
    "SlotPlan",
    "choose_path",
    "inject_multilora",
    "lora_delta",
    "lora_delta_gathered",
    "lora_delta_segmented",
    "plan_rows",
]
