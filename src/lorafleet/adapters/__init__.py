"""Adapters as data: PEFT's directory format, validation against a base, attaching through PEFT."""

from lorafleet.adapters.attach import adapter_from_model, attach, load_adapter, new_adapter
from lorafleet.adapters.format import Adapter, AdapterError, read_adapter, write_adapter
from lorafleet.adapters.methods import METHODS, MethodConfig, parse_targets
from lorafleet.adapters.validate import (
    DEFAULT_MAX_RANK,
    check_adapter,
    describe_adapter,
    fingerprint_status,
)

__all__ = [
    "DEFAULT_MAX_RANK",
    "METHODS",
    "Adapter",
    "AdapterError",
    "MethodConfig",
    "adapter_from_model",
    "attach",
    "check_adapter",
    "describe_adapter",
    "fingerprint_status",
    "load_adapter",
    "new_adapter",
    "parse_targets",
    "read_adapter",
    "write_adapter",
]
