"""Adapters as data: PEFT's directory format, validation against a base, attaching through PEFT."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: the CLI reads the method registry and
# MethodConfig without importing torch or PEFT.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "content_digest": ".format",
        "DEFAULT_MAX_RANK": ".validate",
        "METHODS": ".methods",
        "PEFT_PREFIX": ".lora_keys",
        "Adapter": ".format",
        "AdapterError": ".format",
        "LoraKeyError": ".lora_keys",
        "MethodConfig": ".methods",
        "adapter_from_model": ".attach",
        "attach": ".attach",
        "base_name": ".lora_keys",
        "base_weight_name": ".lora_keys",
        "check_adapter": ".validate",
        "describe_adapter": ".validate",
        "fingerprint_status": ".validate",
        "is_adapter_param": ".lora_keys",
        "load_adapter": ".attach",
        "lora_pairs": ".lora_keys",
        "module_alpha": ".lora_keys",
        "module_rank": ".lora_keys",
        "module_scale": ".lora_keys",
        "new_adapter": ".attach",
        "parse_targets": ".methods",
        "peft_key": ".lora_keys",
        "read_adapter": ".format",
        "split_key": ".lora_keys",
        "strip_prefix": ".lora_keys",
        "uniform_scale": ".lora_keys",
        "write_adapter": ".format",
        "write_init": ".format",
        "INIT_NAME": ".format",
    },
)
