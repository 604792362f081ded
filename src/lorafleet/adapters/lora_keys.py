"""The one place that knows PEFT's LoRA tensor names, per-module rank/alpha and a module's scale.

On disk PEFT stores `base_model.model.<module>.lora_A.weight` [r, d_in] and `...lora_B.weight`
[d_out, r] (the adapter name is dropped); DoRA adds `...lora_magnitude_vector`, MiSS (Bone)
`...miss_block`. A module's rank and alpha come from `rank_pattern` / `alpha_pattern` when a
pattern key matches the module name (PEFT's own `get_pattern_key`), else from `r` / `lora_alpha`;
its scale is alpha / r, or alpha / sqrt(r) with `use_rslora` (PEFT's `LoraLayer.update_layer`).
Every function here is pure: configs are plain dicts (adapter_config.json as read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

from peft.utils.other import get_pattern_key

from lorafleet.errors import LorafleetError

PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer."  # PEFT's wrapper puts the original linear under this name
# On-disk suffix -> the part name `split_key` returns.
PARTS = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "miss_block": "miss_block",
}
SUFFIX_OF = {part: suffix for suffix, part in PARTS.items()}
# Parameter-name markers of adapter weights inside a PEFT-wrapped model (not the base's own).
ADAPTER_MARKERS = ("lora_", "miss_")
# LoraConfig's defaults, used when a config leaves r or lora_alpha out (as PEFT does).
DEFAULT_R = 8
DEFAULT_ALPHA = 8

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
    """True for an adapter weight of a PEFT-wrapped model (lora_A/B, magnitude, miss_block)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def peft_key(module: str, which: str) -> str:
    """PEFT's on-disk key for `which` ("A", "B", "lora_magnitude_vector" or "miss_block")."""
    if which not in SUFFIX_OF:
        raise LoraKeyError(f"unknown LoRA tensor part {which!r}: use {', '.join(SUFFIX_OF)}")
    return f"{PEFT_PREFIX}{module}.{SUFFIX_OF[which]}"


def split_key(key: str) -> tuple[str, str] | None:
    """(module, part) for a PEFT on-disk adapter key, part being "A", "B",
    "lora_magnitude_vector" or "miss_block"; None for anything else (no PEFT prefix, or e.g. a
    modules_to_save copy of a base weight)."""
    if not key.startswith(PEFT_PREFIX):
        return None
    for suffix, part in PARTS.items():
        if key.endswith("." + suffix):
            return key[len(PEFT_PREFIX) : -len(suffix) - 1], part
    return None


def module_parts(tensors: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """{module: {part: tensor}} over every PEFT adapter tensor (A, B, lora_magnitude_vector,
    miss_block), in first-seen order; a key that is none of them is an error."""
    parts: dict[str, dict[str, T]] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            raise LoraKeyError(f"tensor {key} is not a LoRA / DoRA / MiSS adapter weight")
        parts.setdefault(split[0], {})[split[1]] = tensor
    return parts


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


def _pattern_value(config: Mapping, pattern: str, module: str):
    table = config.get(pattern) or {}
    key = get_pattern_key(list(table), module)
    return table.get(key)


def module_rank(config: Mapping, module: str) -> int:
    """The rank of `module` (name without PEFT's prefix): rank_pattern's match, else r."""
    r = _pattern_value(config, "rank_pattern", strip_prefix(module))
    return int(config.get("r", DEFAULT_R) if r is None else r)


def module_alpha(config: Mapping, module: str) -> float:
    """The alpha of `module` (name without PEFT's prefix): alpha_pattern's match, else
    lora_alpha."""
    alpha = _pattern_value(config, "alpha_pattern", strip_prefix(module))
    return float(config.get("lora_alpha", DEFAULT_ALPHA) if alpha is None else alpha)


def scale_of(alpha: float, r: int, rslora: bool) -> float:
    """PEFT's scaling rule: alpha / sqrt(r) for rsLoRA, alpha / r otherwise."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def module_scale(config: Mapping, module: str) -> float:
    """The scale s of `module`'s delta s * B @ A, exactly as PEFT's LoraLayer.scaling holds it."""
    rslora = bool(config.get("use_rslora"))
    return scale_of(module_alpha(config, module), module_rank(config, module), rslora)


def uniform_scale(config: Mapping) -> float:
    """The one scale of a config without rank_pattern / alpha_pattern (an error with them)."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraKeyError("rank_pattern / alpha_pattern give modules different scales")
    return module_scale(config, "")
