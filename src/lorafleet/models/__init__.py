"""Base models: embedded defaults, local dirs, .gguf files and hub ids; fingerprints; generation."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: importing the package loads no model code.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "DEVICES": ".device",
        "DTYPES": ".loader",
        "DeviceConfig": ".device",
        "EMBEDDED": ".sources",
        "Base": ".loader",
        "BaseSource": ".sources",
        "block_linear_modules": "lorafleet.linear_layers",
        "cast_parameters": ".loader",
        "check_device": ".device",
        "describe_model": ".inspect",
        "fingerprint": ".fingerprint",
        "load_base": ".loader",
        "parse_dtype": ".loader",
        "resolve_base": ".sources",
        "resolve_device": ".device",
        "target_names": "lorafleet.linear_layers",
    },
)
