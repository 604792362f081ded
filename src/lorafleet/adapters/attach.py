"""Attach adapters to a base model through PEFT, and turn a PEFT model back into an Adapter."""

from __future__ import annotations

import time
from pathlib import Path

from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from lorafleet import __version__
from lorafleet.adapters.format import WEIGHTS_NAME, Adapter, AdapterError, json_ready, read_adapter
from lorafleet.adapters.lora_keys import is_adapter_param
from lorafleet.adapters.methods import MethodConfig, get_method, peft_config_from_dict
from lorafleet.adapters.validate import DEFAULT_MAX_RANK, check_adapter
from lorafleet.linear_layers import block_linear_modules, target_names


def new_adapter(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a fresh, trainable adapter of `config.method` (its PEFT config; the
    delta starts at zero as PEFT initialises each method)."""
    peft_config = config.peft_config(target_names(model))
    method = get_method(config.method)
    if method.check_targets is not None:
        method.check_targets(_targeted(model, list(peft_config.target_modules)), config.rank)
    return get_peft_model(model, peft_config, adapter_name)


def _targeted(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """{name: (d_out, d_in)} of the block linears that `targets` (names or suffixes) select."""
    return {
        name: (linear.out_features, linear.in_features)
        for name, linear in block_linear_modules(model).items()
        if any(name == t or name.endswith("." + t) for t in targets)
    }


def attach(model: nn.Module, adapter: Adapter, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with `adapter`'s weights for inference. Check the adapter first."""
    config = peft_config_from_dict(adapter.config)
    config.inference_mode = True
    peft_model = get_peft_model(model, config, adapter_name)
    result = set_peft_model_state_dict(peft_model, adapter.tensors, adapter_name=adapter_name)
    # Every adapter parameter must have come from the file; a gap would silently stay at init.
    # (A method's model-wide shared tensors, referenced from every layer, are no parameters.)
    missing = [k for k in result.missing_keys if is_adapter_param(k)]
    if missing:
        raise AdapterError(adapter.where(WEIGHTS_NAME), f"missing tensor for {missing[0]}")
    return peft_model.eval()


def load_adapter(
    path: str | Path,
    model: nn.Module,
    *,
    base_fingerprint: str | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    force: bool = False,
    adapter_name: str = "default",
) -> tuple[Adapter, PeftModel]:
    """Read, check and attach an adapter directory; errors name the file and the problem."""
    adapter = read_adapter(path)
    check_adapter(adapter, model, base_fingerprint=base_fingerprint, max_rank=max_rank, force=force)
    return adapter, attach(model, adapter, adapter_name)


def adapter_from_model(
    peft_model: PeftModel,
    *,
    base_fingerprint: str | None = None,
    adapter_name: str = "default",
    extra_meta: dict | None = None,
) -> Adapter:
    """Snapshot a PEFT model's adapter as an Adapter (PEFT's exact keys and config)."""
    peft_config = peft_model.peft_config[adapter_name]
    config = json_ready(peft_config.to_dict())
    config["inference_mode"] = True
    tensors = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    adapter = Adapter(config=config, tensors=dict(tensors))
    adapter.meta = {
        "base_fingerprint": base_fingerprint,
        "method": adapter.method,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lorafleet_version": __version__,
        **(extra_meta or {}),
    }
    if not base_fingerprint:
        del adapter.meta["base_fingerprint"]
    return adapter
