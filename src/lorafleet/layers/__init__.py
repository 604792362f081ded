"""Torch modules PEFT lacks: multi-adapter linears (SGMV/BGMV), row mixtures, int8/int4 linears,
fused base projections."""

from lorafleet.layers.fused import FusedProjections, can_fuse
from lorafleet.layers.linear import MultiLoRAContext, MultiLoRALinear
from lorafleet.layers.mixture import MixtureGate, MixturePlan, RowMixture, plan_mixtures
from lorafleet.layers.multilora import (
    SEGMENT_MIN_ROWS_PER_SLOT,
    SlotPlan,
    choose_path,
    lora_delta,
    lora_delta_gathered,
    lora_delta_segmented,
    plan_rows,
)
from lorafleet.layers.quant import QuantLinear, quantize_linears, weight_bytes
from lorafleet.layers.quant import check_mode as check_quantize
from lorafleet.layers.slots import MultiLoRAError, MultiLoRAModel, inject_multilora

__all__ = [
    "SEGMENT_MIN_ROWS_PER_SLOT",
    "FusedProjections",
    "can_fuse",
    "MixtureGate",
    "MixturePlan",
    "MultiLoRAContext",
    "MultiLoRAError",
    "MultiLoRALinear",
    "MultiLoRAModel",
    "RowMixture",
    "SlotPlan",
    "choose_path",
    "inject_multilora",
    "lora_delta",
    "lora_delta_gathered",
    "lora_delta_segmented",
    "plan_mixtures",
    "plan_rows",
    "QuantLinear",
    "check_quantize",
    "quantize_linears",
    "weight_bytes",
]
