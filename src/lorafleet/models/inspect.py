"""What a base model offers adapters: family, size and the linear layers to target."""

from __future__ import annotations

from collections import Counter

from torch import nn

from lorafleet.linear_layers import block_linear_modules, target_names


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(model: nn.Module) -> dict:
    """A JSON-ready summary of a base model (no fingerprint: the caller has it)."""
    config = model.config
    counts = Counter(name.rsplit(".", 1)[-1] for name in block_linear_modules(model))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "family": config.model_type,
        "architecture": model.__class__.__name__,
        "parameters": parameter_count(model),
        "layers": getattr(text_config, "num_hidden_layers", None),
        "hidden_size": getattr(text_config, "hidden_size", None),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "targets": {name: counts[name] for name in target_names(model)},
    }
