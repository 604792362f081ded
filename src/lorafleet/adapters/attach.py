"""Attach adapters to a base model through PEFT, and turn a PEFT model back into an Adapter."""

from __future__ import annotations

import time
from pathlib import Path

from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from lorafleet import __version__
from lorafleet.adapters.format import WEIGHTS_NAME, Adapter, AdapterError, json_ready, read_adapter
from lorafleet.adapters.methods import MethodConfig, peft_config_from_dict
from lorafleet.adapters.validate import DEFAULT_MAX_RANK, check_adapter
from lorafleet.errors import LorafleetError
from lorafleet.linear_layers import block_linear_modules, target_names


def new_adapter(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a fresh, trainable adapter (B or the Bone / Bat block starts at zero)."""
    peft_config = config.peft_config(target_names(model))
    if config.method == "bat":
        _check_bat_blocks(model, list(peft_config.target_modules), config.rank)
    return get_peft_model(model, peft_config, adapter_name)


def _check_bat_blocks(model: nn.Module, targets: list[str], r: int) -> None:
    """Bat splits each adapted weight into r x r blocks: in and out features must divide by r."""
    for name, linear in block_linear_modules(model).items():
        targeted = any(name == t or name.endswith("." + t) for t in targets)
        if targeted and (linear.in_features % r or linear.out_features % r):
            raise LorafleetError(
                f"--method bat needs every adapted linear divisible into {r}x{r} blocks; "
                f"{name} is {linear.out_features}x{linear.in_features} (choose another --rank)"
            )


def attach(model: nn.Module, adapter: Adapter, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with `adapter`'s weights for inference. Check the adapter first."""
    config = peft_config_from_dict(adapter.config)
    config.inference_mode = True
    peft_model = get_peft_model(model, config, adapter_name)
    result = set_peft_model_state_dict(peft_model, adapter.tensors, adapter_name=adapter_name)
    # Every adapter parameter must have come from the file; a gap would silently stay at init.
    missing = [k for k in result.missing_keys if f".{adapter_name}" in k or "lora_" in k]
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
