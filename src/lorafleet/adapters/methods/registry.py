"""The registry of adapter methods: one module per method in this package, listed once in ORDER.

Everything that depends on the method (adapter format, validation, key splitting, serving, the
CLI, trainer selection) asks here; a new method is its module plus its name in ORDER.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module

from lorafleet.adapters.methods.base import Method, MethodError, SharedPart

# The methods in the order the CLI lists them, one a line; each is the module
# adapters/methods/<name>.py whose METHOD declares it (imported by name below, so that a new
# method is its module plus one line here). Method modules import only base.py and each other.
ORDER = (
    "lora",
    "rslora",
    "dora",
    "bone",
    "bat",
    "bilora",
    "vera",
)


def _load(name: str) -> Method:
    method = import_module(f"{__package__}.{name}").METHOD
    if method.name != name:
        raise MethodError(f"adapters/methods/{name}.py declares method {method.name!r}")
    return method


METHODS: dict[str, Method] = {name: _load(name) for name in ORDER}
NAMES: tuple[str, ...] = tuple(METHODS)


def lookup(name: str) -> Method | None:
    """The method called `name`, or None."""
    return METHODS.get(name)


def get_method(name: str) -> Method:
    """The method called `name`; a one-line error naming the known ones otherwise."""
    found = METHODS.get(name)
    if found is None:
        raise MethodError(f"unknown method {name!r}: use one of {', '.join(NAMES)}")
    return found


def peft_type_of(config: Mapping) -> str:
    """A config's peft_type as PEFT's upper-case string ("" when absent). An in-memory config
    (adapter_from_model) may hold PEFT's PeftType enum, not its string."""
    value = config.get("peft_type", "")
    return str(getattr(value, "value", value) or "").upper()


def peft_types() -> tuple[str, ...]:
    """Every peft_type some registered method is saved as, in registry order."""
    return tuple(dict.fromkeys(m.peft_type for m in METHODS.values()))


def find_method(config: Mapping) -> Method | None:
    """The method a saved adapter config belongs to (first registered match), or None. A
    config without peft_type is read as a LoraConfig (what the key helpers assume)."""
    peft_type = peft_type_of(config) or "LORA"
    for m in METHODS.values():
        if m.peft_type == peft_type and m.recognises(config):
            return m
    return None


def method_of(config: Mapping) -> Method:
    """find_method, or a one-line error naming the config's peft_type."""
    found = find_method(config)
    if found is None:
        known = ", ".join(peft_types())
        raise MethodError(
            f"no registered method reads peft_type {peft_type_of(config) or None!r} "
            f"with these options (known peft types: {known})"
        )
    return found


def part_suffixes() -> dict[str, str]:
    """{on-disk suffix: part name} over every registered method's module parts. One suffix
    always names one part (methods saved in the same form share their Part objects)."""
    table: dict[str, str] = {}
    for m in METHODS.values():
        for part in m.parts:
            if table.setdefault(part.suffix, part.name) != part.name:
                raise MethodError(
                    f"{m.name}: suffix {part.suffix!r} is already part {table[part.suffix]!r}"
                )
    return table


def shared_parts() -> dict[str, SharedPart]:
    """{model-level key: SharedPart} over every registered method (tensors without a module)."""
    return {p.key: p for m in METHODS.values() for p in m.shared}


def param_prefixes() -> tuple[str, ...]:
    """The parameter-name prefixes of adapter weights inside a PEFT-wrapped model, per
    registered peft_type (PEFT's own tuner prefixes: lora_, miss_, ...)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    return tuple(PEFT_TYPE_TO_PREFIX_MAPPING[t] for t in peft_types())


def with_trainer(kind: str) -> tuple[str, ...]:
    """The names of the methods trained by trainer kind `kind`."""
    return tuple(m.name for m in METHODS.values() if m.trainer == kind)


def servable() -> tuple[str, ...]:
    """The titles of the methods the batched op serves."""
    return tuple(m.title for m in METHODS.values() if not isinstance(m.serve, str))


def cli_help() -> str:
    """The `--method` option's help: every method's name and help line."""
    return " | ".join(f"{m.name}: {m.help}" for m in METHODS.values())
