"""Adapters as data: PEFT's directory format, validation against a base, attaching through PEFT."""

from lorafleet.adapters.attach import adapter_from_model, attach, load_adapter, new_adapter
from lorafleet.adapters.format import (
    INIT_NAME,
    Adapter,
    AdapterError,
    content_digest,
    read_adapter,
    write_adapter,
    write_init,
)
from lorafleet.adapters.lora_keys import (
    PEFT_PREFIX,
    LoraKeyError,
    base_name,
    base_weight_name,
    is_adapter_param,
    lora_pairs,
    module_alpha,
    module_rank,
    module_scale,
    peft_key,
    split_key,
    strip_prefix,
    uniform_scale,
)
from lorafleet.adapters.methods import METHODS, MethodConfig, parse_targets
from lorafleet.adapters.validate import (
    DEFAULT_MAX_RANK,
    check_adapter,
    describe_adapter,
    fingerprint_status,
)

__all__ = [
    "content_digest",
    "DEFAULT_MAX_RANK",
    "METHODS",
    "PEFT_PREFIX",
    "Adapter",
    "AdapterError",
    "LoraKeyError",
    "MethodConfig",
    "adapter_from_model",
    "attach",
    "base_name",
    "base_weight_name",
    "check_adapter",
    "describe_adapter",
    "fingerprint_status",
    "is_adapter_param",
    "load_adapter",
    "lora_pairs",
    "module_alpha",
    "module_rank",
    "module_scale",
    "new_adapter",
    "parse_targets",
    "peft_key",
    "read_adapter",
    "split_key",
    "strip_prefix",
    "uniform_scale",
    "write_adapter",
    "write_init",
    "INIT_NAME",
]
