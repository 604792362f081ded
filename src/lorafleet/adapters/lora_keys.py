"""The one place that knows PEFT's on-disk adapter tensor names, per-module rank/alpha and scale.

On disk PEFT stores each adapted module's tensors as `base_model.model.<module>.<suffix>` (the
adapter name is dropped), e.g. LoRA's `lora_A.weight` [r, d_in] and `lora_B.weight` [d_out, r];
which suffixes exist, and what part each is, every method declares in its module of
adapters/methods/ (this module reads them from the registry). A method's tensors shared by every
module (shared projections, say) have a model-level key of their own. A module's rank and alpha come
from `rank_pattern` / `alpha_pattern` when a pattern key matches the module name (PEFT's own
`get_pattern_key`), else from `r` / `lora_alpha`; its scale is alpha / r, or alpha / sqrt(r) with
`use_rslora` (PEFT's `LoraLayer.update_layer`; the rules live in adapters/methods/base.py, below
the method modules that use them). Every function here is pure: configs are plain dicts
(adapter_config.json as read).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from lorafleet.adapters.methods import base
from lorafleet.adapters.methods.registry import param_prefixes, part_suffixes, shared_parts
from lorafleet.errors import LorafleetError

PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer."  # PEFT's wrapper puts the original linear under this name
# On-disk suffix -> the part name `split_key` returns, over every registered method.
PARTS = part_suffixes()
SUFFIX_OF = {part: suffix for suffix, part in PARTS.items()}
# Model-level keys of tensors shared by every module (no module in the key).
SHARED_KEYS = frozenset(shared_parts())
# Parameter-name markers of adapter weights inside a PEFT-wrapped model (not the base's own).
ADAPTER_MARKERS = param_prefixes()

T = TypeVar("T")


class LoraKeyError(LorafleetError):
    """Tensors that do not form LoRA A/B pairs under PEFT's names (one line)."""


def strip_prefix(name: str) -> str:
    """`base_model.model.X` -> `X`; a name without PEFT's prefix is returned unchanged."""
    return name.removeprefix(PEFT_PREFIX)


def base_name(name: str) -> str:
    """A PEFT-wrapped model's parameter name under the base model's own name:
    `base_model.model.m.q_proj.base_layer.weight` -> `m.q_proj.weight`."""
    return strip_prefix(name).replace(BASE_LAYER, ".")


def base_weight_name(module: str) -> str:
    """The base weight a module's LoRA adapts: `m.layers.0.q_proj` -> `m.layers.0.q_proj.weight`."""
    return strip_prefix(module) + ".weight"


def is_adapter_param(name: str) -> bool:
    """True for an adapter weight of a PEFT-wrapped model (lora_A/B, magnitude, miss_block, ...:
    PEFT's parameter prefix of a registered peft_type)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def peft_key(module: str, which: str) -> str:
    """PEFT's on-disk key for part `which` of `module` ("A", "B", "lora_magnitude_vector",
    "miss_block", ...: a registered method's part name)."""
    if which not in SUFFIX_OF:
        raise LoraKeyError(f"unknown LoRA tensor part {which!r}: use {', '.join(SUFFIX_OF)}")
    return f"{PEFT_PREFIX}{module}.{SUFFIX_OF[which]}"


def split_key(key: str) -> tuple[str, str] | None:
    """(module, part) for a PEFT on-disk adapter key, part being a registered method's part
    name ("A", "B", "lora_magnitude_vector", "miss_block", ...); None for anything else (no
    PEFT prefix, a shared model-level tensor, or e.g. a modules_to_save copy of a base
    weight)."""
    if not key.startswith(PEFT_PREFIX):
        return None
    for suffix, part in PARTS.items():
        if key.endswith("." + suffix):
            return key[len(PEFT_PREFIX) : -len(suffix) - 1], part
    return None


def module_parts(tensors: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """{module: {part: tensor}} over every per-module adapter tensor, in first-seen order;
    shared model-level tensors (shared_tensors) are left out; any other key is an error."""
    parts: dict[str, dict[str, T]] = {}
    for key, tensor in tensors.items():
        if key in SHARED_KEYS:
            continue
        split = split_key(key)
        if split is None:
            raise LoraKeyError(f"tensor {key} is not an adapter weight of any registered method")
        parts.setdefault(split[0], {})[split[1]] = tensor
    return parts


def shared_tensors(tensors: Mapping[str, T]) -> dict[str, T]:
    """{key: tensor} of the model-level tensors shared by every module (SharedPart keys)."""
    return {key: t for key, t in tensors.items() if key in SHARED_KEYS}


def lora_pairs(tensors: Mapping[str, T], *, strict: bool = True) -> dict[str, tuple[T, T]]:
    """{module: (A, B)} in first-seen order. A module with only one of A and B is an error;
    so is (when `strict`) any tensor that is not a LoRA A/B weight."""
    parts: dict[str, dict[str, T]] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None or split[1] not in ("A", "B"):
            if strict:
                raise LoraKeyError(f"tensor {key} is not a LoRA A/B weight")
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
    for module, pair in parts.items():
        if len(pair) != 2:
            raise LoraKeyError(f"{module} has only {next(iter(pair))}; LoRA needs A and B")
    return {module: (pair["A"], pair["B"]) for module, pair in parts.items()}


def module_rank(config: Mapping, module: str) -> int:
    """The rank of `module` (name with or without PEFT's prefix): rank_pattern's match, else r."""
    return base.module_rank(config, strip_prefix(module))


def module_alpha(config: Mapping, module: str) -> float:
    """The alpha of `module` (name with or without PEFT's prefix): alpha_pattern's match, else
    lora_alpha."""
    return base.module_alpha(config, strip_prefix(module))


def module_scale(config: Mapping, module: str) -> float:
    """The scale s of `module`'s delta s * B @ A, exactly as PEFT's LoraLayer.scaling holds it."""
    return base.lora_scale(config, strip_prefix(module))


def uniform_scale(config: Mapping) -> float:
    """The one scale of a config without rank_pattern / alpha_pattern (an error with them)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraKeyError("rank_pattern / alpha_pattern give modules different scales")
    return module_scale(config, "")
