"""Check an adapter against a base model: types, ranks, targets, tensor shapes, fingerprint."""

from __future__ import annotations

import re

from torch import nn

from lorafleet.adapters.format import WEIGHTS_NAME, Adapter, AdapterError
from lorafleet.adapters.lora_keys import (
    PEFT_PREFIX,
    LoraKeyError,
    lora_pairs,
    module_rank,
    split_key,
    strip_prefix,
)

DEFAULT_MAX_RANK = 256
# The tensor parts (lora_keys.split_key) each peft_type may hold.
LORA_PARTS = ("A", "B", "lora_magnitude_vector")
MISS_PARTS = ("miss_block",)


def _check_rank(adapter: Adapter, max_rank: int) -> None:
    ranks = {"r": adapter.config.get("r")}
    ranks.update(
        {f"rank_pattern[{k}]": v for k, v in (adapter.config.get("rank_pattern") or {}).items()}
    )
    for where, r in ranks.items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterError(adapter.where(), f"{where} must be a positive integer, got {r!r}")
        if r > max_rank:
            raise AdapterError(
                adapter.where(), f"rank {r} ({where}) is above the limit of {max_rank}"
            )


def _target_matches(target: str, names: list[str]) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def _check_targets(adapter: Adapter, linear_names: list[str]) -> None:
    targets = adapter.config.get("target_modules")
    if targets is None:
        raise AdapterError(adapter.where(), "target_modules is missing")
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        try:
            ok = any(re.fullmatch(targets, n) for n in linear_names)
        except re.error as exc:
            raise AdapterError(adapter.where(), f"target_modules regex is invalid ({exc})") from exc
        if not ok:
            raise AdapterError(
                adapter.where(), f"target_modules {targets!r} matches no layer of the base"
            )
        return
    missing = [t for t in targets if not _target_matches(str(t), linear_names)]
    if missing:
        raise AdapterError(
            adapter.where(),
            f"target modules the base lacks: {', '.join(map(str, sorted(missing)))}",
        )


def _expected_shape(adapter: Adapter, part: str, module: nn.Linear, r: int) -> tuple[int, ...]:
    out_f, in_f = module.out_features, module.in_features
    if adapter.config.get("fan_in_fan_out"):
        in_f, out_f = out_f, in_f
    if part == "A":
        return (r, in_f)
    if part == "B":
        return (out_f, r)
    if part == "lora_magnitude_vector":
        return (out_f,)
    init = adapter.config.get("init_weights", True)  # miss_block
    if init == "bat":
        return (out_f // r, r, r)
    if init == "mini":
        return (r, int(adapter.config.get("mini_r", 1)))
    return (r, out_f)


def _check_tensors(adapter: Adapter, model: nn.Module) -> None:
    file = adapter.where(WEIGHTS_NAME)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    parts = LORA_PARTS if adapter.peft_type == "LORA" else MISS_PARTS
    seen: set[str] = set()
    for key, tensor in adapter.tensors.items():
        split = split_key(key)
        if split is None or split[1] not in parts:
            # modules_to_save stores full copies of base weights under the base's own names.
            name = strip_prefix(key) if key.startswith(PEFT_PREFIX) else None
            if name in params:
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise AdapterError(
                        file,
                        f"tensor {key} has shape {tuple(tensor.shape)}, "
                        f"the base's {name} is {tuple(params[name].shape)}",
                    )
                continue
            raise AdapterError(file, f"unexpected tensor {key} for peft_type {adapter.peft_type}")
        module_name, part = split
        module = modules.get(module_name)
        if module is None:
            raise AdapterError(file, f"tensor {key} targets {module_name}, which the base lacks")
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                file, f"{module_name} is a {type(module).__name__}, not a linear layer"
            )
        r = module_rank(adapter.config, module_name)
        expected = _expected_shape(adapter, part, module, r)
        if tuple(tensor.shape) != expected:
            raise AdapterError(
                file, f"tensor {key} has shape {tuple(tensor.shape)}, expected {expected}"
            )
        seen.add(module_name)
    if adapter.peft_type == "LORA":
        try:
            lora_pairs(adapter.tensors, strict=False)
        except LoraKeyError as exc:
            raise AdapterError(file, str(exc)) from exc
    if not seen:
        raise AdapterError(file, f"holds no {adapter.peft_type} weights")


def check_adapter(
    adapter: Adapter,
    model: nn.Module,
    *,
    base_fingerprint: str | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    force: bool = False,
) -> None:
    """Raise AdapterError (file + problem, one line) unless `adapter` fits `model`."""
    task = adapter.config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterError(adapter.where(), f"task_type {task!r} is not CAUSAL_LM")
    _check_rank(adapter, max_rank)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    _check_targets(adapter, linear_names)
    _check_tensors(adapter, model)
    theirs = adapter.meta.get("base_fingerprint")
    if base_fingerprint and theirs and theirs != base_fingerprint and not force:
        raise AdapterError(
            adapter.where(WEIGHTS_NAME),
            f"trained on another base (fingerprint {theirs}, this base is {base_fingerprint}); "
            "pass --force to load it anyway",
        )


def fingerprint_status(adapter: Adapter, base_fingerprint: str) -> str:
    """'match', 'mismatch' or 'unknown' (adapters made outside lorafleet carry no fingerprint)."""
    theirs = adapter.meta.get("base_fingerprint")
    if not theirs:
        return "unknown"
    return "match" if theirs == base_fingerprint else "mismatch"


def describe_adapter(adapter: Adapter, base_fingerprint: str | None = None) -> dict:
    """A JSON-ready summary of an adapter (call after check_adapter for a compatibility verdict)."""
    summary = {
        "path": str(adapter.path) if adapter.path else None,
        "peft_type": adapter.peft_type,
        "method": adapter.method,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "targets": adapter.targets,
        "parameters": adapter.num_parameters,
        "base_fingerprint": adapter.meta.get("base_fingerprint"),
        "created": adapter.meta.get("created"),
    }
    if base_fingerprint:
        summary["fingerprint_check"] = fingerprint_status(adapter, base_fingerprint)
    return summary
