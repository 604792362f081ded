"""Base models: embedded defaults, local dirs, .gguf files and hub ids; fingerprints; generation."""

from lorafleet.linear_layers import block_linear_modules, target_names
from lorafleet.models.fingerprint import fingerprint
from lorafleet.models.inspect import describe_model
from lorafleet.models.loader import DTYPES, Base, cast_parameters, load_base, parse_dtype
from lorafleet.models.sources import EMBEDDED, BaseSource, resolve_base

__all__ = [
    "DTYPES",
    "EMBEDDED",
    "Base",
    "BaseSource",
    "block_linear_modules",
    "cast_parameters",
    "describe_model",
    "fingerprint",
    "load_base",
    "parse_dtype",
    "resolve_base",
    "target_names",
]
