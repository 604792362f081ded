"""Merged export: fold merged LoRA deltas into a base model and write a transformers directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorafleet.adapters.lora_keys import base_weight_name
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_dir

RECIPE_FILE = "lorafleet-merge.json"


@torch.no_grad()
def fold_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """W += delta for every {module: delta} (module names as in the adapter), in place, in W's
    dtype; a module the base lacks or of another shape is a one-line error."""
    params = dict(model.named_parameters())
    for module, delta in deltas.items():
        name = base_weight_name(module)
        p = params.get(name)
        if p is None:
            raise LorafleetError(f"the adapters target {module}, which this base lacks")
        if tuple(p.shape) != tuple(delta.shape):
            raise LorafleetError(
                f"{module}: delta {tuple(delta.shape)} does not fit the base's {tuple(p.shape)}"
            )
        p.add_(delta.to(device=p.device, dtype=torch.float64).to(p.dtype))


def write_model_dir(model, tokenizer, out: Path, recipe: dict) -> Path:
    """Save model (safetensors) + tokenizer + the recipe into `out`, all or nothing: written to
    a temp dir beside it, then renamed over any older `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorafleetError(f"{out}: exists and is not a directory")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    return out
