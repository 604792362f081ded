"""The linear layers adapters attach to (shared by models/ and adapters/, both on floor 1)."""

from __future__ import annotations

from torch import nn


def block_linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the transformer blocks, by full name; the output head is left out
    (PEFT's 'all-linear' rule, made explicit so configs list real module names)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output
    }


def target_names(model: nn.Module) -> list[str]:
    """The distinct suffixes (q_proj, ..., down_proj) of the block linears, in model order."""
    seen: dict[str, None] = {}
    for name in block_linear_modules(model):
        seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)
