"""Data for training and evaluation: user files, built-in tasks, prompt masking, batching."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: importing the package loads no torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BUILTIN_TASKS": ".tasks",
        "BuiltinTask": ".tasks",
        "Collator": ".encode",
        "DataError": ".examples",
        "Encoded": ".encode",
        "Example": ".examples",
        "bos_to_add": ".encode",
        "ExampleSet": ".examples",
        "encode": ".encode",
        "encode_all": ".encode",
        "load_examples": ".load",
        "pack": ".encode",
        "split_name": ".load",
    },
)
