"""Adapter methods, one module each (lora, rslora, dora, bone, bat, bilora, ...), and their
registry: what each declares is in base.Method; everything else asks the registry."""

from lorafleet.adapters.methods.base import (
    BILEVEL_TRAINER,
    PEFT_TRAINER,
    Dims,
    Method,
    MethodError,
    ModuleWeights,
    Part,
    PeftOptions,
    SharedPart,
    SlotEntry,
)
from lorafleet.adapters.methods.config import (
    DEFAULT_ALPHA,
    DEFAULT_RANK,
    MethodConfig,
    parse_targets,
    peft_config_from_dict,
)
from lorafleet.adapters.methods.registry import (
    NAMES,
    cli_help,
    find_method,
    get_method,
    lookup,
    method_of,
    peft_type_of,
    peft_types,
    servable,
    with_trainer,
)

# The registered method names, in CLI order (kept under its old name for importers).
METHODS = NAMES

__all__ = [
    "BILEVEL_TRAINER",
    "DEFAULT_ALPHA",
    "DEFAULT_RANK",
    "METHODS",
    "NAMES",
    "PEFT_TRAINER",
    "Dims",
    "Method",
    "MethodConfig",
    "MethodError",
    "ModuleWeights",
    "Part",
    "PeftOptions",
    "SharedPart",
    "SlotEntry",
    "cli_help",
    "find_method",
    "get_method",
    "lookup",
    "method_of",
    "parse_targets",
    "peft_config_from_dict",
    "peft_type_of",
    "peft_types",
    "servable",
    "with_trainer",
]
