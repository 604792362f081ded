"""Check an adapter against a base model: types, ranks, targets, tensor shapes, fingerprint."""

from __future__ import annotations

import re

from peft.utils.other import get_pattern_key
from torch import nn

from lorafleet.adapters.format import WEIGHTS_NAME, Adapter, AdapterError

DEFAULT_MAX_RANK = 256
PREFIX = "base_model.model."
# PEFT's on-disk tensor suffixes per peft_type (the adapter name is dropped on disk).
LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
MISS_SUFFIXES = ("miss_block",)


def _rank_for(adapter: Adapter, module: str) -> int:
    pattern = adapter.config.get("rank_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    return int(pattern.get(key, adapter.rank))


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


def _expected_shape(adapter: Adapter, suffix: str, module: nn.Linear, r: int) -> tuple[int, ...]:
    out_f, in_f = module.out_features, module.in_features
    if adapter.config.get("fan_in_fan_out"):
        in_f, out_f = out_f, in_f
    if suffix == "lora_A.weight":
        return (r, in_f)
    if suffix == "lora_B.weight":
        return (out_f, r)
    if suffix == "lora_magnitude_vector":
        return (out_f,)
    init = adapter.config.get("init_weights", True)  # miss_block
    if init == "bat":
        return (out_f // r, r, r)
    if init == "mini":
        return (r, int(adapter.config.get("mini_r", 1)))
    return (r, out_f)


def _split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    if not key.startswith(PREFIX):
        return None
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1], suffix
    return None


def _check_tensors(adapter: Adapter, model: nn.Module) -> None:
    file = adapter.where(WEIGHTS_NAME)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    suffixes = LORA_SUFFIXES if adapter.peft_type == "LORA" else MISS_SUFFIXES
    seen: dict[str, set[str]] = {}
    for key, tensor in adapter.tensors.items():
        split = _split_key(key, suffixes)
        if split is None:
            # modules_to_save stores full copies of base weights under the base's own names.
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else None
            if name in params:
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise AdapterError(
                        file,
                        f"tensor {key} has shape {tuple(tensor.shape)}, "
                        f"the base's {name} is {tuple(params[name].shape)}",
                    )
                continue
            raise AdapterError(file, f"unexpected tensor {key} for peft_type {adapter.peft_type}")
        module_name, suffix = split
        module = modules.get(module_name)
        if module is None:
            raise AdapterError(file, f"tensor {key} targets {module_name}, which the base lacks")
        if not isinstance(module, nn.Linear):
            raise AdapterError(
                file, f"{module_name} is a {type(module).__name__}, not a linear layer"
            )
        expected = _expected_shape(adapter, suffix, module, _rank_for(adapter, module_name))
        if tuple(tensor.shape) != expected:
            raise AdapterError(
                file, f"tensor {key} has shape {tuple(tensor.shape)}, expected {expected}"
            )
        seen.setdefault(module_name, set()).add(suffix)
    if adapter.peft_type == "LORA":
        for module_name, parts in seen.items():
            if not {"lora_A.weight", "lora_B.weight"} <= parts:
                raise AdapterError(
                    file, f"{module_name} has only {sorted(parts)}; LoRA needs A and B"
                )
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
