"""Data for training and evaluation: user files, built-in tasks, prompt masking, batching."""

from lorafleet.data.encode import Collator, Encoded, bos_to_add, encode, encode_all, pack
from lorafleet.data.examples import DataError, Example, ExampleSet
from lorafleet.data.load import load_examples, split_name
from lorafleet.data.tasks import BUILTIN_TASKS, BuiltinTask

__all__ = [
    "BUILTIN_TASKS",
    "BuiltinTask",
    "Collator",
    "DataError",
    "Encoded",
    "Example",
    "bos_to_add",
    "ExampleSet",
    "encode",
    "encode_all",
    "load_examples",
    "pack",
    "split_name",
]
