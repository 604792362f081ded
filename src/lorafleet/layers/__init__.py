"""Torch modules PEFT lacks: multi-adapter linears (SGMV/BGMV), row mixtures, int8/int4 linears,
fused base projections, exact fast norms."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: importing the package loads no torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "SEGMENT_MIN_ROWS_PER_SLOT": ".multilora",
        "FusedProjections": ".fused",
        "base_layer": ".fused",
        "base_linear": ".fused",
        "base_product": ".linear",
        "fast_norm": ".norm",
        "is_llama_rms_norm": ".norm",
        "can_concat": ".quant",
        "can_fuse": ".fused",
        "MixtureGate": ".mixture",
        "MixturePlan": ".mixture",
        "MultiLoRAContext": ".linear",
        "MultiLoRAError": ".slots",
        "MultiLoRALinear": ".linear",
        "MultiLoRAModel": ".slots",
        "RowMixture": ".mixture",
        "SlotPlan": ".multilora",
        "choose_path": ".multilora",
        "inject_multilora": ".slots",
        "lora_delta": ".multilora",
        "lora_delta_gathered": ".multilora",
        "lora_delta_segmented": ".multilora",
        "plan_mixtures": ".mixture",
        "plan_rows": ".multilora",
        "QuantLinear": ".quant",
        "check_quantize": ".quant:check_mode",
        "check_quantize_device": ".quant:check_device",
        "quantize_linears": ".quant",
        "weight_bytes": ".quant",
    },
)
