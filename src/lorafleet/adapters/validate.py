"""Check an adapter against a base model: types, ranks, targets, tensor shapes (as its method in
adapters/methods/ declares them), fingerprint."""

from __future__ import annotations

import re

from torch import nn

from lorafleet.adapters.format import WEIGHTS_NAME, Adapter, AdapterError
from lorafleet.adapters.lora_keys import PEFT_PREFIX, module_rank, split_key, strip_prefix
from lorafleet.adapters.methods.base import Dims, MethodError
from lorafleet.adapters.methods.registry import method_of

DEFAULT_MAX_RANK = 256


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


def _dims(adapter: Adapter, module: nn.Linear, r: int) -> Dims:
    out_f, in_f = module.out_features, module.in_features
    if adapter.config.get("fan_in_fan_out"):
        in_f, out_f = out_f, in_f
    return Dims(out_f, in_f, r, adapter.config)


def _shape_error(file, key: str, shape, expected) -> AdapterError:
    return AdapterError(file, f"tensor {key} has shape {tuple(shape)}, expected {expected}")


def _check_tensors(adapter: Adapter, model: nn.Module) -> None:
    """Every tensor is one of the method's parts (adapters/methods/) of a linear the base has,
    with the shape the method declares; each adapted module has all of them; the method's
    shared tensors are there (when its config saves them) with their declared shapes."""
    file = adapter.where(WEIGHTS_NAME)
    try:
        method = method_of(adapter.config)
    except MethodError as exc:
        raise AdapterError(adapter.where(), str(exc)) from exc
    parts = {p.name: p for p in method.parts}
    shared_parts = {p.key: p for p in method.shared}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    seen: dict[str, set[str]] = {}
    dims: list[Dims] = []
    for key, tensor in adapter.tensors.items():
        if key in shared_parts:
            continue  # checked below, against every adapted module's dims
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
        d = _dims(adapter, module, module_rank(adapter.config, module_name))
        expected = parts[part].shape(d)
        if tuple(tensor.shape) != expected:
            raise _shape_error(file, key, tensor.shape, expected)
        if module_name not in seen:
            dims.append(d)
        seen.setdefault(module_name, set()).add(part)
    if not seen:
        raise AdapterError(file, f"holds no {adapter.peft_type} weights")
    for module_name, have in seen.items():
        missing = [p for p in parts if p not in have]
        if missing:
            raise AdapterError(
                file,
                f"{module_name} has only {', '.join(sorted(have))}; "
                f"{method.title} needs {', '.join(parts)}",
            )
    for key, part in shared_parts.items():
        if key not in adapter.tensors:
            if part.required(adapter.config):
                raise AdapterError(file, f"{method.title} tensor {key} is missing")
            continue
        expected = part.shape(adapter.config, dims)
        if tuple(adapter.tensors[key].shape) != expected:
            raise _shape_error(file, key, adapter.tensors[key].shape, expected)


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
